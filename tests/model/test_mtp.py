"""Multi-token prediction: the loss it adds, the tokens it reads, its gradients, and its absence on export."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from components.model import Transformer, load_pretrained


def _ids_labels(cfg, B=2, T=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)
    labels[0, :3] = -100  # a masked prompt
    return ids, labels


def test_lm_loss_is_cross_entropy_of_the_logits(kit):
    torch.manual_seed(0)
    model = Transformer(kit.cfg())
    ids, labels = _ids_labels(model.cfg)
    out = model.compute_loss(ids, labels)
    expected = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, expected)
    assert out.mtp_loss is None and out.aux_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert int(out.n_tokens) == int((labels != -100).sum())


def test_mtp_loss_is_lambda_over_depth_times_the_sum_of_depth_losses(kit):
    torch.manual_seed(1)
    D, lam = 2, 0.3
    model = Transformer(kit.cfg(mtp_depth=D, mtp_loss_weight=lam))
    ids, labels = _ids_labels(model.cfg, T=15)
    out = model.compute_loss(ids, labels)

    # Independent recomputation: h^0 = trunk output before the final norm; depth k reads t_{i+k}.
    W = model.output_weight()
    h, _ = model._trunk(ids)
    T = ids.shape[1]
    depth_losses = []
    for k, module in enumerate(model.mtp, start=1):
        cos, sin = model._rope(0, T - k, ids.device)
        x = module.eh_proj(torch.cat([module.enorm(model.embed_tokens(ids[:, k:])), module.hnorm(h[:, : T - k])], -1))
        h, _ = module(x, cos, sin)
        logits = F.linear(module.shared_head.norm(h), W)
        depth_losses.append(F.cross_entropy(logits.flatten(0, 1), labels[:, k:].flatten(), ignore_index=-100))
    torch.testing.assert_close(out.mtp_loss, lam / D * sum(depth_losses))
    torch.testing.assert_close(out.loss, out.lm_loss + out.mtp_loss)


def test_mtp_depth1_target_is_the_token_two_ahead(kit):
    """Changing input token j changes the depth-1 loss only through positions >= j-1 (it is read at i=j-1)."""
    torch.manual_seed(2)
    model = Transformer(kit.cfg(mtp_depth=1))
    ids, labels = _ids_labels(model.cfg, T=12)
    labels[:, :] = -100
    labels[:, 4] = ids[:, 5]  # only one target kept: the depth-1 module predicts it from position 3
    base = model.compute_loss(ids, labels).mtp_loss
    ids2 = ids.clone()
    ids2[:, 8] = (ids2[:, 8] + 1) % model.cfg.vocab_size  # after every position the kept target depends on
    torch.testing.assert_close(model.compute_loss(ids2, labels).mtp_loss, base)
    ids3 = ids.clone()
    ids3[:, 4] = (ids3[:, 4] + 1) % model.cfg.vocab_size  # t_{i+1} for i = 3: the MTP embedding input
    assert not torch.allclose(model.compute_loss(ids3, labels).mtp_loss, base)


def test_mtp_modules_get_gradients_and_share_embedding_and_head(kit):
    torch.manual_seed(3)
    model = Transformer(kit.cfg(mtp_depth=1))
    assert not any(n.startswith("mtp.") and ("embed" in n or "lm_head" in n) for n, _ in model.named_parameters())
    ids, labels = _ids_labels(model.cfg)
    model.compute_loss(ids, labels).mtp_loss.backward()
    for name, p in model.mtp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_mtp_is_dropped_on_export_and_at_inference(kit, hf_twin):
    torch.manual_seed(4)
    model = Transformer(kit.cfg(mtp_depth=1)).eval()
    no_mtp = Transformer(kit.cfg(mtp_depth=0)).eval()
    no_mtp.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), no_mtp(ids))  # forward never runs the MTP modules
    hf, path = hf_twin(model)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        layers = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}
    assert layers == set(range(model.cfg.num_hidden_layers))
    assert hf.config.num_hidden_layers == model.cfg.num_hidden_layers
    back = load_pretrained(path)
    assert back.cfg.mtp_depth == 0 and len(back.mtp) == 0
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=1e-6, rtol=0)
