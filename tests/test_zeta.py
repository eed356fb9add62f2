"""ζ′, the truthfulness direction in the hidden space: fixed at fit time by a least-squares decoder of the
truthfulness space, so the Fig. 4c variants give different directions and every edit carries its layer's."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import unike
from unike.spaces import Spaces


def test_decoder_inverts_a_linear_encoder_by_hand():
    torch.manual_seed(0)
    sp = Spaces(3, hidden=4, truth_dim=3)
    sp.tru.net = torch.nn.Linear(3, 3, bias=True)                   # an invertible linear "encoder"
    h = torch.randn(200, 3) * torch.tensor([1.0, 2.0, 3.0]) + 5
    sp.standardize.fit(h)
    sp.fit_decoder(h, ridge=0.0)
    w = sp.tru.net.weight.detach()                                  # z = s·Wᵀ + c, so Dec = (Wᵀ)⁻¹
    assert torch.allclose(sp.decoder, torch.linalg.inv(w.T), atol=1e-4)
    sp.zeta.copy_(torch.tensor([1.0, -1.0, 0.5]))
    assert torch.allclose(sp.zeta_prime(), (sp.zeta @ torch.linalg.inv(w.T)) * sp.standardize.std, atol=1e-4)


@pytest.fixture(scope="module")
def tiny(tiny_states):
    model, processor = unike.load_tiny()
    yield model, processor, tiny_states, unike.SynthWorld(seed=0).edit_cases("vqa", n=1, seed=23)[0]


@pytest.mark.slow
def test_variants_give_different_fixed_directions(tiny):
    model, processor, states, case = tiny
    primes = {}
    for kind in ("truthful", "semantic", "random", "none"):
        editor = unike.UniKE(model, processor, unike.UniKEConfig(zeta=kind, edit_steps=5))
        editor.fit_states(states, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            editor.edit(case)
        l = editor.layer_ids[-1]
        patch = editor.neurons[l]
        if kind == "none":
            assert patch.truth.numel() == 0 and not patch.zeta.any()
        else:
            assert torch.equal(patch.zeta[-1], patch.truth)         # the edit carries the fitted ζ′, untrained
            primes[kind] = patch.truth
        editor.detach()
    t, s, r = primes["truthful"], primes["semantic"], primes["random"]
    assert torch.isclose(r.norm(), t.norm())
    for a, b in ((t, s), (t, r), (s, r)):
        assert F.cosine_similarity(a, b, dim=0).abs() < 0.9
