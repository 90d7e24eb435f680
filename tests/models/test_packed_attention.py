"""Packing is exact: each sample of a pack gets the logits it gets alone (and V2PE positions feed RoPE)."""

import pytest
import torch


@pytest.fixture(scope="module")
def model():
    from internvl_mcore.config import ParallelConfig, get_preset
    from internvl_mcore.parallel.state import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    from internvl_mcore.models.internvl import build_model
    from internvl_mcore.parallel.state import process_groups
    from internvl_mcore.models.weights import init_weights

    cfg = get_preset("debug")
    m = build_model(cfg, ParallelConfig(), process_groups())
    init_weights(m, cfg, seed=3)
    return m.eval(), cfg


def _sample(cfg, n_text, tiles, seed):
    g = torch.Generator().manual_seed(seed)
    img = [cfg.img_start_token_id] + [cfg.img_context_token_id] * (tiles * cfg.num_image_token) + [cfg.img_end_token_id]
    ids = torch.tensor(img * (tiles > 0) + torch.randint(1, 400, (n_text,), generator=g).tolist())
    pix = torch.randn(tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, pix


@torch.no_grad()
def test_pack_of_two_equals_each_alone(model):
    m, cfg = model
    a_ids, a_pix = _sample(cfg, 23, 2, 0)
    b_ids, b_pix = _sample(cfg, 17, 1, 1)
    la, lb = len(a_ids), len(b_ids)
    alone_a = m(a_ids[None], torch.arange(la, dtype=torch.float32)[None], a_pix)
    alone_b = m(b_ids[None], torch.arange(lb, dtype=torch.float32)[None], b_pix)
    pos = torch.cat([torch.arange(la), torch.arange(lb)]).float()[None]
    packed = m(
        torch.cat([a_ids, b_ids])[None],
        pos,
        torch.cat([a_pix, b_pix]),
        cu_seqlens=torch.tensor([0, la, la + lb], dtype=torch.int32),
    )
    torch.testing.assert_close(packed[:, :la], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, la:], alone_b, rtol=1e-5, atol=1e-5)
    # without the boundaries the second sample would see the first: the test can fail
    unpacked = m(torch.cat([a_ids, b_ids])[None], pos, torch.cat([a_pix, b_pix]))
    assert (unpacked[:, la:] - alone_b).abs().max() > 1e-3


@torch.no_grad()
def test_batch_rows_and_float_positions(model):
    m, cfg = model
    a_ids, a_pix = _sample(cfg, 20, 1, 2)
    n = len(a_ids)
    pos = torch.arange(n, dtype=torch.float32)
    pos_v2pe = pos.clone()
    img = a_ids == cfg.img_context_token_id
    pos_v2pe[img] = pos[img.nonzero()[0]] + 0.5 * torch.arange(int(img.sum()))  # delta 1/2 on visual tokens
    one = m(a_ids[None], pos_v2pe[None], a_pix)
    two = m(
        torch.stack([a_ids, a_ids]),
        torch.stack([pos, pos_v2pe]),
        torch.cat([a_pix, a_pix]),
        cu_seqlens=torch.tensor([0, n, 2 * n], dtype=torch.int32),
    )
    torch.testing.assert_close(two[1:], one, rtol=1e-5, atol=1e-5)
    assert (two[0] - two[1]).abs().max() > 1e-4  # float positions change RoPE, so the rows differ
