import pytest

from ipu_app.sparse.flops import (
    non_embedding_params,
    non_embedding_training_flops_per_sequence,
    rigl_dense_gradient_flops,
    run_flops,
    total_training_flops,
    training_flops_ledger,
)

PAPER = [  # (L, H, s, FLOPs per sequence of 128 tokens), paper Table 1 and A.8
    (4, 256, 0.0, 2.617e9),  # Mini dense
    (4, 512, 0.0, 1.0066e10),  # Small dense
    (8, 512, 0.9, 2.738e9),  # Medium s = 0.9
    (12, 768, 0.9, 8.335e9),  # Base s = 0.9
]


@pytest.mark.parametrize("L, H, s, expected", PAPER)
def test_paper_flops(L, H, s, expected):
    assert non_embedding_training_flops_per_sequence(L, H, 128, s) == pytest.approx(expected, rel=5e-4)


def test_non_embedding_params_of_the_family():
    assert non_embedding_params(8, 512) == 25_165_824
    assert non_embedding_params(12, 768) == 84_934_656


def test_ledger_and_run_totals():
    ledger = training_flops_ledger(8, 512, 128, 0.9, vocab_size=30522, masked_per_sequence=20)
    assert ledger.non_embedding == pytest.approx(non_embedding_training_flops_per_sequence(8, 512, 128, 0.9))
    assert ledger.mlm_head == pytest.approx(6 * 20 * (512 * 512 + 512 * 30522))
    assert ledger.total > ledger.non_embedding
    assert training_flops_ledger(8, 512, 128, 0.9, nsp=False).nsp_head == 0
    per_seq = ledger.non_embedding
    assert total_training_flops(8, 512, 128, 0.9, steps=10, sequences_per_step=4) == pytest.approx(per_seq * 40)
    with_rigl = total_training_flops(8, 512, 128, 0.9, steps=10, sequences_per_step=4, dense_gradient_steps=2)
    assert with_rigl - per_seq * 40 == pytest.approx(2 * 4 * rigl_dense_gradient_flops(8, 512, 128))
    assert rigl_dense_gradient_flops(8, 512, 128) == 2 * 25_165_824 * 128


def test_a_runs_flops_at_its_actual_density():
    # BERT-Medium, 128 tokens, 2,516,582 of 25,165,824 encoder weights active (s = 0.9 less rounding):
    # 6 x active x 128 for the sparse products plus 12 L S^2 H for attention, per sequence.
    active = 2_516_582
    got = run_flops(8, 512, 128, active, steps=100, sequences_per_step=16, dense_gradient_steps=3)
    per_sequence = 6 * active * 128 + 12 * 8 * 128**2 * 512
    assert got["non_embedding_flops_per_sequence"] == pytest.approx(per_sequence, rel=1e-12)
    assert got["non_embedding_nonzero_params"] == active and got["dense_gradient_steps"] == 3
    rigl = 3 * 16 * 2 * 25_165_824 * 128
    assert got["total_training_flops"] == pytest.approx(per_sequence * 100 * 16 + rigl, rel=1e-12)
    assert run_flops(8, 512, 128, active, 100, 16)["total_training_flops"] == pytest.approx(per_sequence * 1600)
