"""audit: the stage (stage.py) and what only it uses: the gates (gates, and the safety
and fairness ones in safety_gates), the report a reviewer reads (report) and its plots
(plots)."""
