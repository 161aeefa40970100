"""The key maps commute with RoPE: merging then rotating equals rotating then merging."""

import pytest
import torch

from kvconvert.merge import rope


def random_complex(*shape):
    return torch.complex(torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64))


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(16, 16), (16, 8), (12, 4)])
def test_encoder_and_decoder_commute_with_rope(head_dim, rotary_dim):
    torch.manual_seed(0)
    n_src, p = 3, head_dim - rotary_dim
    enc, dec = random_complex(rotary_dim // 2, n_src), random_complex(rotary_dim // 2, n_src)
    pass_enc = torch.randn(p, n_src * p, dtype=torch.float64) if p else None
    pass_dec = torch.randn(n_src * p, p, dtype=torch.float64) if p else None
    e, d = rope.real_maps(enc, dec, head_dim, rotary_dim, pass_enc, pass_dec)
    angles = torch.rand(rotary_dim // 2, dtype=torch.float64) * 100
    keys = torch.randn(5, n_src, head_dim, dtype=torch.float64)
    rotated_then_merged = rope.rotate(keys, angles, rotary_dim).reshape(5, -1) @ e.T
    merged_then_rotated = rope.rotate(keys.reshape(5, -1) @ e.T, angles, rotary_dim)
    torch.testing.assert_close(rotated_then_merged, merged_then_rotated)
    new = torch.randn(5, head_dim, dtype=torch.float64)
    decoded_then_rotated = rope.rotate((new @ d.T).reshape(5, n_src, head_dim), angles, rotary_dim)
    rotated_then_decoded = (rope.rotate(new, angles, rotary_dim) @ d.T).reshape(5, n_src, head_dim)
    torch.testing.assert_close(decoded_then_rotated, rotated_then_decoded)


def test_real_maps_match_complex_arithmetic():
    torch.manual_seed(1)
    head_dim, n_src = 8, 2
    enc, dec = random_complex(4, n_src), random_complex(4, n_src)
    e, d = rope.real_maps(enc, dec, head_dim, head_dim)
    keys = torch.randn(n_src, head_dim, dtype=torch.float64)
    z = torch.complex(keys[:, :4], keys[:, 4:]).T  # (pairs, S)
    y = (enc.conj() * z).sum(-1)
    merged = e @ keys.reshape(-1)
    torch.testing.assert_close(torch.complex(merged[:4], merged[4:]), y)
    decoded = (d @ merged).reshape(n_src, head_dim)
    torch.testing.assert_close(torch.complex(decoded[:, :4], decoded[:, 4:]).T, dec * y.unsqueeze(-1))


def test_a_real_mixing_of_pairs_does_not_commute():
    """Sanity check of the test itself: a generic real map fails the commutation check."""
    torch.manual_seed(2)
    m = torch.randn(8, 8, dtype=torch.float64)
    angles = torch.rand(4, dtype=torch.float64) * 10
    x = torch.randn(3, 8, dtype=torch.float64)
    assert not torch.allclose(rope.rotate(x, angles, 8) @ m.T, rope.rotate(x @ m.T, angles, 8))


def test_complex_moment_matches_definition():
    torch.manual_seed(3)
    n_src, head_dim = 3, 8
    keys = torch.randn(1000, n_src * head_dim, dtype=torch.float64)
    cov = keys.T @ keys / 1000
    z = torch.complex(keys.reshape(1000, n_src, head_dim)[..., :4], keys.reshape(1000, n_src, head_dim)[..., 4:])
    want = torch.einsum("nsp,ntp->pst", z, z.conj()) / 1000
    torch.testing.assert_close(rope.complex_moment(cov, n_src, head_dim, head_dim), want)
