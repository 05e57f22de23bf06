"""Spike detection against the rolling median of recent steps."""
from __future__ import annotations

from megatron_ext.spikes import MIN_HISTORY, NullSpikeDetector, SpikeDetector
from tests.conftest import make_config


def test_a_gradient_norm_far_above_the_median_is_a_spike_and_the_next_is_judged_too():
    """The demo's grad norm 40.4 against a median of 0.75 passed without a word."""
    detector = SpikeDetector(window=100, loss_factor=1.5, grad_norm_factor=10.0)
    for step in range(30):
        assert detector.step(3.0 - step * 0.01, 0.75, applied=True) == []
    spikes = detector.step(2.7, 40.4, applied=True)
    assert [(s.name, s.value, s.median) for s in spikes] == [("grad norm", 40.4, 0.75)]
    assert spikes[0].describe(31) == ("grad norm 40.4 at step 31: 53.9x the median of the last "
                                      "steps (0.75)")
    assert [s.name for s in detector.step(2.7, 39.0, applied=True)] == ["grad norm"]
    assert detector.step(2.69, 0.8, applied=True) == []


def test_a_loss_jump_is_a_spike_and_early_or_skipped_steps_are_not_judged():
    detector = SpikeDetector(window=20, loss_factor=1.5, grad_norm_factor=10.0)
    for _ in range(MIN_HISTORY - 1):
        detector.step(6.0, 1.0, applied=True)
    assert detector.step(60.0, 1.0, applied=False) == []  # a skipped step changes nothing
    detector.step(6.0, 1.0, applied=True)
    assert [s.name for s in detector.step(9.5, 1.0, applied=True)] == ["loss"]


def test_only_rank_0_judges_and_the_switch_turns_it_off():
    cfg = make_config()
    assert isinstance(SpikeDetector.from_config(cfg, rank=0), SpikeDetector)
    assert isinstance(SpikeDetector.from_config(cfg, rank=1), NullSpikeDetector)
    cfg.resilience.spikes.enabled = False
    assert isinstance(SpikeDetector.from_config(cfg, rank=0), NullSpikeDetector)
