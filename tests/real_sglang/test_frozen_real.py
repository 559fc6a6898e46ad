"""Frozen engines stay frozen, on real SGLang 0.5.23 servers (rollout/frozen.py).

The shared learner pool plays a frozen engine: fingerprinted (teacher-forced log-probs through
SGLang's own prefill scoring), then taken through the paths a trainer can take (a replica killed
and restarted by the engine, a memory release and resume) and checked after each; a server that
now serves other weights must fail the check. The pool is reset to its initial weights and
version 0 afterwards, as the other tests of the tier expect.
"""

from __future__ import annotations

import signal

import pytest

from megatron_s2lpo.rollout import GenerateRequest
from megatron_s2lpo.rollout.frozen import FrozenGuard, FrozenWeightsError
from megatron_s2lpo.utils.process_group import signal_group

pytestmark = pytest.mark.slow


@pytest.fixture
def frozen_pool(learner_pool, model_dirs):
    yield learner_pool
    learner_pool.update_weights_from_disk(model_dirs["learner"], 0)
    assert learner_pool.replica_versions() == {"learner[0]": 0, "learner[1]": 0}


def test_a_restart_keeps_the_fingerprint_and_other_weights_fail_it(frozen_pool, model_dirs, tok):
    pool = frozen_pool
    guard = FrozenGuard(pool, "explorer", vocab_size=len(tok), tolerance=1e-4)
    assert guard.check_if_disturbed(1) is None  # nothing happened: no check
    # the replica's server dies; the engine relaunches it on the next request (from its model path)
    restarts = pool.num_restarts
    signal_group(pool.replicas[1].process._proc, signal.SIGKILL)
    reqs = [GenerateRequest(request_id=f"frozen-{i}", prompt_ids=tok.encode("1+2="), max_new_tokens=4)
            for i in range(8)]
    pool.generate(reqs)
    assert pool.num_restarts > restarts
    assert guard.check_if_disturbed(2) < 1e-4  # checked after the restart: the same weights
    # the same URL now serves other weights (a frozen server relaunched from a replaced checkpoint)
    pool.update_weights_from_disk(model_dirs["learner_alt"], 0)
    with pytest.raises(FrozenWeightsError, match="frozen explorer engine"):
        guard.check("a relaunch")
