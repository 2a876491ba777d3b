"""`trainer.online.push_weights`: a push (naming the version it makes) whose answer was lost, or whose
server restarted, lands once.

The real server cannot be made to apply a push and then lose its answer on demand (a SIGKILL loses
the applied weights too: tests/reliability/test_kill.py covers that case against real services),
so these drive the decision against a scripted stand-in for the client's two weight calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from assay.clients import Conflict, Unavailable
from assay.trainer.online import push_weights

pytestmark = pytest.mark.unit


@dataclass
class ScriptedServer:
    """`update_weights` and `weight_version` of a server at `version`, taking a push only above it, as
    the version it names; `script` says, per push, what happens: "ok", "lost-applied" (applied, answer
    lost), "lost" (not applied, answer lost), "restarted" (killed mid-push: back at 0, answer lost),
    "unavailable" (answered 503 until the deadline)."""

    version: int
    script: list[str]
    pushes: list[int] = field(default_factory=list)  # the target version of each push
    adapters: list[tuple] = field(default_factory=list)  # (names, alpha, r, fan_in_fan_out) of each adapter push

    def update_weights(self, state, *, version, timeout_s=None):
        self.pushes.append(version)
        if version <= self.version:
            raise Conflict(f"at weight_version {self.version}", status=409)
        what = self.script.pop(0) if self.script else "ok"
        if what in ("ok", "lost-applied"):
            self.version = version
        if what == "restarted":
            self.version = 0
        if what.startswith("lost") or what == "restarted":
            err = Unavailable("connection reset")
            err.unanswered = True
            raise err
        if what == "unavailable":
            raise Unavailable("still loading", status=503)
        return type("Reply", (), {"weight_version": self.version})()

    def update_adapter(self, tensors, *, lora_alpha, r, fan_in_fan_out, version, timeout_s=None):
        self.adapters.append((sorted(tensors), lora_alpha, r, fan_in_fan_out))
        return self.update_weights(tensors, version=version, timeout_s=timeout_s)

    def weight_version(self, timeout_s=None):
        return self.version


MODEL = torch.nn.Linear(2, 2)


def test_a_push_that_landed_with_its_answer_lost_is_not_sent_again():
    server = ScriptedServer(version=4, script=["lost-applied"])
    assert push_weights(server, MODEL, 5) == 5 and server.pushes == [5]


def test_a_push_lost_before_it_landed_is_sent_again():
    server = ScriptedServer(version=4, script=["lost"])
    assert push_weights(server, MODEL, 5) == 5 and server.pushes == [5, 5]


def test_a_server_restarted_mid_push_takes_the_same_version_directly():
    server = ScriptedServer(version=4, script=["restarted"])  # back at 0: versions count from 0 again
    assert push_weights(server, MODEL, 5) == 5 and server.pushes == [5, 5]
    assert push_weights(ScriptedServer(version=0, script=[]), MODEL, 5) == 5


def test_a_push_refused_because_it_landed_already_counts_as_landed():
    server = ScriptedServer(version=5, script=[])  # a retry of a push whose first answer was lost
    assert push_weights(server, MODEL, 5) == 5 and server.pushes == [5]


def test_another_writer_stops_the_run_and_an_answered_failure_is_raised():
    with pytest.raises(Conflict, match="another writer"):
        push_weights(ScriptedServer(version=7, script=[]), MODEL, 5)
    with pytest.raises(Unavailable, match="still loading"):
        push_weights(ScriptedServer(version=4, script=["unavailable"]), MODEL, 5)


def test_a_lora_model_pushes_its_adapter_alone_with_the_same_lost_answer_logic():
    from assay.checkpoints import load_embedded
    from assay.trainer import lora
    from assay.trainer.config import LoRA

    model = lora.wrap(load_embedded("policy")[0], LoRA(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    server = ScriptedServer(version=4, script=["lost"])
    assert push_weights(server, model, 5) == 5 and server.pushes == [5, 5]
    names, alpha, r, fan_in_fan_out = server.adapters[0]
    assert (alpha, r, fan_in_fan_out) == (4.0, 2, False)
    assert names == sorted(
        f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
        for i in range(4)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    )
