"""learner.memory: a learner rank's bytes by ZeRO stage, hand-computed."""
import pytest

from learner.memory import learner_memory, model_state_bytes

QWEN25_05B = dict(n_params=494_032_768, layers=24, hidden=896, vocab=151_936)
"""Qwen2.5-0.5B: parameters with the tied embedding counted once, from its config.json."""


@pytest.mark.parametrize("stage, ranks, bf16, per_param", [
    (0, 1, False, 16.0),          # 4 weights + 4 grads + 8 Adam
    (1, 4, False, 4 + 4 + 8 / 4),
    (2, 4, True, 2 + 14 / 4),     # ZeRO paper Fig. 1: 2 + (2 + 12) / W
    (3, 8, True, 16 / 8),
    (1, 2, True, 2 + 2 + 12 / 2),
])
def test_model_states_follow_the_zero_partitioning(stage, ranks, bf16, per_param):
    assert model_state_bytes(1_000_000, stage, ranks, bf16) == int(per_param * 1_000_000)


def test_qwen05b_micro_batch_of_16k_tokens():
    need = learner_memory(**QWEN25_05B, micro_batch_tokens=16384, zero_stage=2, num_ranks=1, bf16=True,
                          reference_model=False)
    assert need.model_states == 16 * 494_032_768
    assert need.activations == 24 * 34 * 896 * 16384            # 16-bit: 34 h T bytes per layer
    assert need.logits == 16384 * 151_936 * (2 + 8)
    assert need.reference == 0
    assert need.total == 7_904_524_288 + 11_978_932_224 + 24_893_194_240


def test_reference_model_and_fp32_double_the_activation_bytes():
    fp32 = learner_memory(**QWEN25_05B, micro_batch_tokens=1024, zero_stage=0, num_ranks=1, bf16=False,
                          reference_model=True)
    assert fp32.activations == 24 * 34 * 896 * 1024 * 2
    assert fp32.logits == 1024 * 151_936 * 12
    assert fp32.reference == 4 * 494_032_768


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        model_state_bytes(10, 4, 1, True)
