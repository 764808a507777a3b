"""Data order: a pure function of (seed, manifest, step), blended to within one sequence."""

import numpy as np
import pytest

from refit.stages.mix.manifest import Manifest
from refit.stages.mix.stage import run_mix
from refit.stages.tokenize.stage import run_tokenize
from refit.stages.train.sampler import Sampler, blend


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.45, 0.45, 0.1], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
def test_blend_holds_weights_over_every_prefix(weights):
    owners = blend(np.array(weights), 997)
    for source, weight in enumerate(weights):
        counts = np.cumsum(owners == source)
        ideal = weight * np.arange(1, len(owners) + 1)
        assert np.max(np.abs(counts - ideal)) <= 1.0


def test_order_is_pure_and_never_repeats_before_exhaustion(curated):  # noqa: F811
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    manifest = run_mix(recipe, workdir)
    a, b = Sampler(manifest, workdir), Sampler(Manifest.model_validate_json(manifest.model_dump_json()), workdir)
    per_step = manifest.sequences_per_step
    total = manifest.total_steps * per_step
    slots = [a.slot(i) for i in range(total)]
    assert slots == [b.slot(i) for i in reversed(range(total))][::-1]  # any order of asking, same answer
    assert np.array_equal(a.batch(3, range(per_step)), b.batch(3, range(per_step)))
    for source in range(len(a.sources)):
        rows = [row for s, row in slots if s == source]
        size = a.sources[source].rows
        for epoch in range(0, len(rows), size):  # each epoch is a permutation of the source
            chunk = rows[epoch : epoch + size]
            assert len(set(chunk)) == len(chunk)
    reseeded = Sampler(manifest.model_copy(update={"seed": manifest.seed + 1}), workdir)
    other = [reseeded.slot(i) for i in range(total)]
    assert [s for s, _ in other] == [s for s, _ in slots]  # which source fills a slot: the manifest's blend
    assert [row for _, row in other] != [row for _, row in slots]  # which row: the seed's permutation
    switch = manifest.phases[1].start_step * per_step
    qa_new = sum(1 for s, _ in slots[switch:] if a.sources[s].name == "new") / (total - switch)
    assert qa_new == pytest.approx(0.75, abs=1 / (total - switch) + 1e-9)


def test_the_optimizer_warmup_draws_the_first_phase_on_a_stream_of_its_own(curated):  # noqa: F811
    """The warm-up's sequences: the first phase's blend, each source read in permutations of
    its own (another sample of the same data, not the first steps' batches), a pure function of
    the warm-up step; the schedule's sequences are those of a run without a warm-up."""
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    manifest = run_mix(recipe, workdir)
    warmup_steps, per_step = 6, manifest.sequences_per_step
    plain, warm = Sampler(manifest, workdir), Sampler(manifest, workdir, warmup_steps)
    total = manifest.total_steps * per_step
    assert [warm.slot(i) for i in range(total)] == [plain.slot(i) for i in range(total)]
    drawn = [warm.slot(i, warmup=True) for i in range(warmup_steps * per_step)]
    again = Sampler(manifest, workdir, warmup_steps)
    assert [again.slot(i, warmup=True) for i in reversed(range(len(drawn)))][::-1] == drawn
    assert np.array_equal(warm.batch(2, range(per_step), warmup=True), again.batch(2, range(per_step), warmup=True))
    weights = np.array([manifest.phases[0].weights.get(source.name, 0.0) for source in warm.sources])
    assert [s for s, _ in drawn] == blend(weights, len(drawn)).tolist()  # the manifest normalised them
    assert warm.phase_counts(0, warmup=True) == {"old": per_step // 2, "new": per_step // 2}
    assert drawn != [plain.slot(i) for i in range(len(drawn))]  # not the first steps' sequences
    for source in range(len(warm.sources)):  # no repeat within an epoch of a source
        rows = [row for s, row in drawn if s == source]
        assert len(rows) <= warm.sources[source].rows and len(set(rows)) == len(rows)
