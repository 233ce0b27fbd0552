"""Each loss against a naive, loop-based reference on small tensors: values and gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.adversarial import AdversarialLoss
from pipeline.losses.autoencoder import AutoencoderLoss
from pipeline.losses.contrastive import ContrastiveLoss
from pipeline.losses.mae import MaeLoss
from pipeline.losses.mlm import MlmLoss
from pipeline.losses.siglip import SigLipLoss
from pipeline.models.discriminator import GradReverse
from tests.helpers.tolerance import close

pytestmark = pytest.mark.numeric

torch.set_num_threads(1)


def features(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    return image, text, scale


def naive_infonce(image, text, scale, same_modality):
    """The seed's formula written out term by term."""
    n = image.shape[0]
    total = 0.0
    for anchors, others in ((image, text), (text, image)):
        for i in range(n):
            pos = torch.exp(scale * anchors[i].dot(others[i]))
            denom = sum(torch.exp(scale * anchors[i].dot(others[j])) for j in range(n))
            if same_modality:
                denom = denom + sum(torch.exp(scale * anchors[i].dot(anchors[j])) for j in range(n) if j != i)
            total = total - torch.log(pos / denom)
    return total / (2 * n)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("same_modality", [False, True])
def test_contrastive_matches_naive_reference(same_modality):
    image, text, scale = features()
    ours = ContrastiveLoss(same_modality_negatives=same_modality)(image, text, scale)
    ref = naive_infonce(image, text, scale, same_modality)
    assert close(ours, ref, rtol=1e-10)
    for a, b in zip(grads(ours, image, text, scale), grads(ref, image, text, scale)):
        assert close(a, b, rtol=1e-8)


def test_same_modality_negatives_raise_the_loss():
    image, text, scale = features()
    plain = ContrastiveLoss()(image, text, scale)
    extra = ContrastiveLoss(same_modality_negatives=True)(image, text, scale)
    assert extra > plain  # more terms in every denominator


def test_siglip_matches_naive_reference():
    image, text, scale = features()
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    ours = SigLipLoss()(image, text, scale, bias)
    n = image.shape[0]
    ref = -sum(F.logsigmoid(torch.tensor(1.0 if i == j else -1.0, dtype=torch.float64)
                            * (scale * image[i].dot(text[j]) + bias)) for i in range(n) for j in range(n)) / n
    assert close(ours, ref, rtol=1e-10)
    for a, b in zip(grads(ours, image, text, scale, bias), grads(ref, image, text, scale, bias)):
        assert close(a, b, rtol=1e-8)


def test_mae_loss_is_mean_squared_error_against_per_patch_normalised_targets():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)   # the masked patches
    target = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    loss = MaeLoss(norm_pix=True)(pred, target)
    terms = []
    for b in range(2):
        for n in range(3):
            t = target[b, n]
            t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
            terms.append(((pred[b, n] - t) ** 2).mean())
    ref = sum(terms) / len(terms)
    assert close(loss, ref, rtol=1e-10)
    for a, b in zip(grads(loss, pred), grads(ref, pred)):
        assert close(a, b, rtol=1e-10)


def test_mae_loss_without_norm_pix_is_plain_mse():
    pred, target = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    target[0, 1] = 3.0
    assert MaeLoss(norm_pix=False)(pred, target).item() == pytest.approx(5.0)


def test_mlm_loss_is_mean_token_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 3])
    ref = -sum(torch.log_softmax(logits[i], 0)[targets[i]] for i in range(4)) / 4
    ours = MlmLoss()(logits, targets)
    assert close(ours, ref, rtol=1e-10)
    assert close(grads(ours, logits)[0], grads(ref, logits)[0], rtol=1e-10)
    assert MlmLoss()(logits[:0], targets[:0]).item() == 0.0


def test_autoencoder_loss_is_text_plus_image_term():
    g = torch.Generator().manual_seed(3)
    image_pred = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    image = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    logits = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, 8, 0, 4])
    total, text_loss, image_loss = AutoencoderLoss()(image_pred, image, logits, targets)
    ref_img = ((image_pred - image) ** 2).sum() / image.numel()
    ref_txt = -sum(torch.log_softmax(logits[i], 0)[targets[i]] for i in range(5)) / 5
    assert close(image_loss, ref_img, rtol=1e-10) and close(text_loss, ref_txt, rtol=1e-10)
    assert close(total, ref_img + ref_txt, rtol=1e-10)
    for a, b in zip(grads(total, image_pred, logits), grads(ref_img + ref_txt, image_pred, logits)):
        assert close(a, b, rtol=1e-10)


def test_adversarial_loss_and_gradient_reversal():
    g = torch.Generator().manual_seed(4)
    img_logits = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    txt_logits = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    loss, accuracy = AdversarialLoss()(img_logits, txt_logits)
    ref = (-torch.log(torch.sigmoid(img_logits)).mean() - torch.log(1 - torch.sigmoid(txt_logits)).mean()) / 2
    assert close(loss, ref, rtol=1e-10)
    for a, b in zip(grads(loss, img_logits, txt_logits), grads(ref, img_logits, txt_logits)):
        assert close(a, b, rtol=1e-10)
    assert accuracy.item() == pytest.approx(((img_logits > 0).double().mean() + (txt_logits <= 0).double().mean()).item() / 2)
    # Gradient reversal: identity forward, -scale x gradient backward.
    x = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    y = GradReverse.apply(x, 0.25)
    assert torch.equal(y, x)
    (gx,) = torch.autograd.grad((y * torch.arange(4.0, dtype=torch.float64)).sum(), x)
    assert close(gx, -0.25 * torch.arange(4.0, dtype=torch.float64), rtol=1e-10)
