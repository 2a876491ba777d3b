"""The build pipeline end to end at toy scale: every stage runs, saves, reloads, and repeats exactly."""

import pytest
from safetensors.torch import load_file

from assay.build import BuildConfig, build
from assay.checkpoints import load_model
from assay.trainer.config import RMConfig, SFTConfig

pytestmark = pytest.mark.unit

MICRO = BuildConfig(
    hidden_size=32,
    layers=1,
    heads=2,
    intermediate_size=64,
    policy=SFTConfig(steps=3, batch_size=8, warmup_steps=0),
    rollout_problems=16,
    rollouts_per_problem=2,
    orm=RMConfig(steps=2, batch_size=4, warmup_steps=0),
    prm=SFTConfig(steps=2, batch_size=4, warmup_steps=0),
    verifier=SFTConfig(steps=2, batch_size=4, warmup_steps=0),
)
KINDS = {
    "policy": "causal_lm",
    "orm": "sequence_classification",
    "prm": "token_classification",
    "verifier": "causal_lm",
}


@pytest.mark.slow  # trains all four toy checkpoints, twice
def test_build_writes_four_loadable_checkpoints_deterministically(tmp_path):
    build(tmp_path / "a", MICRO, log=lambda _: None)
    build(tmp_path / "b", MICRO, log=lambda _: None)
    for name, kind in KINDS.items():
        load_model(tmp_path / "a" / name, kind)  # loads: raises CheckpointError otherwise
        assert (tmp_path / "a" / name / "tokenizer.json").is_file()
        a = load_file(str(tmp_path / "a" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / name / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), f"{name} differs between two builds"


def test_prefix_labels_agree_with_step_labels_at_step_ends():
    import random

    from assay.arith import world
    from assay.arith.checks import segments, step_labels
    from assay.build import prefix_examples
    from assay.generation import Sample

    rng = random.Random(0)
    data = []
    for p in world.take("train", 200, seed=4):
        text = list(p.solution)
        for _ in range(rng.randint(0, 2)):  # zero to two single-character slips
            text[rng.randrange(len(text))] = rng.choice("0123456789+-=#x")
        data.append((p, [Sample("".join(text), [], [], "stop")]))
    checked = 0
    for (p, [s]), ex in zip(data, prefix_examples(data)[::2]):  # every other example is the reference
        assert ex.response == s.text
        by_end = dict(zip(ex.step_ends, ex.labels))
        for seg, label in zip(segments(s.text), step_labels(p, s.text)):
            if " " not in s.text[seg.start : seg.end].replace("#### ", ""):
                assert by_end[seg.end] == label, (s.text, seg)
                checked += 1
    assert checked > 400
