import pytest
import torch
import torch.nn.functional as F

from ipu_app.model.mlm_loss import mlm_loss_and_correct


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_matches_cross_entropy_loss_gradient_and_argmax(dtype, chunk):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(37, 501, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 501, (37,), generator=g)
    targets[:5] = logits[:5].float().argmax(-1)  # some rows predicted right
    ours = logits.clone().requires_grad_()
    loss, correct = mlm_loss_and_correct(ours, targets, chunk=chunk)
    (loss * 2.5).backward()
    ref = logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref.float(), targets)
    (ref_loss * 2.5).backward()
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6, abs=1e-6)
    assert int(correct) == int((logits.argmax(-1) == targets).sum()) >= 5
    assert ours.grad.dtype == dtype
    tol = 1e-7 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), rtol=0, atol=tol)


def test_bad_shapes_and_no_rows():
    with pytest.raises(ValueError, match="rows, vocab"):
        mlm_loss_and_correct(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    loss, correct = mlm_loss_and_correct(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(loss) and int(correct) == 0
