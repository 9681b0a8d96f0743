"""Attention maps on the diffusion transformers (pipelines/joint_attention.py) and the methods built on them: the
captured maps equal the image->text block of the joint attention computed from the queries and keys the attention
itself receives (softmax over the text keys), the layer outputs are unchanged, the maps are differentiable in the
latents; trigger words are found among the tokens the transformer attends to (FLUX: T5's, SD3: CLIP's then T5's);
tokenroute's masks follow the attention of the named tokens, reach the transformer's gates, and with masks of
ones it is unfused Merge; CMLoRA runs
without the UNet feature cache and equals its no-cache reference; CLoRA runs (one concept, no update, threshold 0 =
unfused Merge)."""

from __future__ import annotations

import pytest
import torch
from dit_references import composite_reference, flux_predict, sd3_predict, write_peft_lora

from loraloom.composition.methods import Step, make_method
from loraloom.composition.routing import Routing
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.tiny_dit import build_tiny_flux, build_tiny_sd3

pytestmark = pytest.mark.usefixtures("one_thread")

BUILD = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
PROMPT = "ohwx and zorp, inkwash"
TOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = {}
    for family, build in BUILD.items():
        folder = tmp_path_factory.mktemp(family)
        pipe = build(0)
        out[family] = {n: write_peft_lora(pipe, folder, n, seed=i + 1, text_encoder=False)
                       for i, n in enumerate(("a", "b", "c"))}
    return out


def _pipeline(family, files, names=("a", "b", "c")):
    cp = ComposedPipeline(BUILD[family](0))
    for n in names:
        cp.load_lora(files[family][n])
    return cp


def _gen(cp, loras, method, steps=3, **params):
    return cp(PROMPT, loras=list(loras), method=method, method_params=params, num_inference_steps=steps, height=32,
              width=32, guidance_scale=3.5, seed=0, output_type="latent", progress_bar=False)


# --- the maps ---------------------------------------------------------------------------------------------------------
def test_token_positions_are_the_denoisers_text_tokens():
    flux = ComposedPipeline(build_tiny_flux(0))
    with flux.run([], PROMPT, "", 3.5, 32, 32, num_inference_steps=2) as run:
        # T5 (character-level tiny tokenizer): '▁ohwx' at 0..4, '▁zorp' at 9..13; CLIP is not attended to
        assert run.token_indices(PROMPT, ["ohwx", "zorp", "meow"]) == [[0, 1, 2, 3, 4], [9, 10, 11, 12, 13], []]
    sd3 = ComposedPipeline(build_tiny_sd3(0))
    with sd3.run([], PROMPT, "", 3.5, 32, 32, num_inference_steps=2) as run:
        # CLIP positions (BOS = 0), then T5's from 77
        assert run.token_indices(PROMPT, ["ohwx", "zorp"]) == [[1, 2, 3, 4, 77, 78, 79, 80, 81], [8, 9, 10, 11, 86, 87, 88, 89, 90]]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_maps_equal_the_joint_attentions_image_to_text_block(family, monkeypatch):
    """The maps equal softmax over the text keys of (image queries x text keys) / sqrt(d), from the queries and keys
    the attention kernel itself receives (recorded at the kernel), averaged over heads and the joint blocks; the
    output is the uncaptured prediction's, bit for bit; `output=False` stops after the last joint block."""
    cp = ComposedPipeline(BUILD[family](0))
    seen = []
    if family == "flux":
        import diffusers.models.transformers.transformer_flux as tf

        real = tf.dispatch_attention_fn

        def spy(query, key, value, **kw):  # (b, seq, heads, d), text first
            seen.append((query.transpose(1, 2), key.transpose(1, 2)))
            return real(query, key, value, **kw)

        monkeypatch.setattr(tf, "dispatch_attention_fn", spy)
    else:
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(query, key, value, **kw):  # (b, heads, seq, d), image first
            seen.append((query, key))
            return real(query, key, value, **kw)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with cp.run([], PROMPT, "", 3.5, 32, 32, num_inference_steps=2) as run:
        pos = run.encode([{}])[0][1]
        latents = torch.randn(1, *cp.arch.latent_shape(32, 32)[1:], generator=torch.Generator().manual_seed(1))
        step = Step(0, 2, run.scheduler.timesteps[0])
        tokens = torch.tensor([[0, 1, 2, 9, 300 if family == "flux" else 80]])
        plain = run.predict(latents, step, pos, Routing.none())
        seen.clear()
        out, maps = run.predict_with_attention(latents, step, pos, Routing.none(), tokens)
        n_txt = pos.hidden.shape[1]
        blocks = len(cp.pipe.transformer.transformer_blocks)
        probs = []
        for q, k in seen[:blocks]:
            if family == "flux":
                qi, kt = q[:, :, n_txt:], k[:, :, :n_txt]
            else:
                qi, kt = q[:, :, :-n_txt], k[:, :, -n_txt:]
            probs.append(((qi @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1))
        ref = torch.stack(probs).mean((0, 2))[0][:, tokens[0]]  # mean over blocks and heads, (image tokens, K)
        grid = cp.arch.attention_grid(tuple(latents.shape[-2:]))
        assert maps.shape == (1, *grid, 5) and grid == {"flux": (8, 8), "sd3": (16, 16)}[family]
        torch.testing.assert_close(maps[0].reshape(-1, 5), ref, atol=1e-6, rtol=1e-5)
        assert torch.equal(out, plain)
        seen.clear()
        none, maps2 = run.predict_with_attention(latents, step, pos, Routing.none(), tokens, output=False)
        assert none is None and torch.equal(maps2, maps)
        assert len(seen) == blocks  # stopped after the last joint block (FLUX: before the single-stream blocks)
        with pytest.raises(ValueError, match="cells across"):
            run.predict_with_attention(latents, step, pos, Routing.none(), tokens, map_side=3)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_maps_are_differentiable_in_the_latents(family):
    """The gradient of a map-based loss with respect to the latents (CLoRA's update) matches a central finite
    difference along a random direction."""
    cp = ComposedPipeline(BUILD[family](0))
    with cp.run([], PROMPT, "", 3.5, 32, 32, num_inference_steps=2) as run:
        pos = run.encode([{}])[0][1]
        g = torch.Generator().manual_seed(2)
        z = torch.randn(1, *cp.arch.latent_shape(32, 32)[1:], generator=g, dtype=torch.float64).float()
        d = torch.randn(z.shape, generator=g)
        step = Step(0, 2, run.scheduler.timesteps[0])
        tokens = torch.tensor([[1, 2, 9, 10]])
        weight = torch.randn(*cp.arch.attention_grid(tuple(z.shape[-2:])), 4, generator=g)

        def loss(x):
            return (run.predict_with_attention(x, step, pos, Routing.none(), tokens, output=False)[1][0] * weight).sum()

        with torch.enable_grad():
            x = z.clone().requires_grad_(True)
            grad = torch.autograd.grad(loss(x), x)[0]
        eps = 1e-2
        with torch.no_grad():
            fd = (loss(z + eps * d) - loss(z - eps * d)) / (2 * eps)
        assert grad.abs().sum() > 0
        assert (grad * d).sum().item() == pytest.approx(fd.item(), rel=2e-2, abs=1e-5)


# --- tokenroute ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_tokenroute_masks_follow_the_named_tokens(family, files, monkeypatch):
    """Attention made to look where the words are (the first trigger's tokens attended by the left half of the image
    tokens, the second's by the right half): the masks give each subject LoRA its half, at the latent's size
    (upsampled from the token grid as on the UNet: bilinear at the seam)."""
    import loraloom.pipelines.joint_attention as ja

    cp = _pipeline(family, files)
    with cp.run(["a", "b", "c"], PROMPT, "", 3.5, 32, 32, num_inference_steps=3) as run:
        m = make_method("tokenroute", {"concepts": {"a": "ohwx", "b": "zorp"}, "roles": {"c": "global"}})
        m.prepare(run)
        ohwx, zorp = run.token_indices(PROMPT, ["ohwx", "zorp"])
        assert m.positions == {"a": ohwx, "b": zorp}
        grid = cp.arch.attention_grid((16, 16))

        def fake(attn, fam, hidden_states, encoder_hidden_states, image_rotary_emb=None):
            b, n_txt = hidden_states.shape[0], encoder_hidden_states.shape[1]
            p = torch.full((b, 2, *grid, n_txt), 1e-3)
            p[..., :grid[1] // 2, ohwx] = 1.0
            p[..., grid[1] // 2:, zorp] = 1.0
            return p.flatten(2, 3) / p.sum(-1).flatten(2, 3)[..., None]

        monkeypatch.setattr(ja, "image_text_probs", fake)
        set_masks = {}
        monkeypatch.setattr(type(run), "set_masks", lambda self, masks: set_masks.update(masks))
        latents = torch.zeros(1, *cp.arch.latent_shape(32, 32)[1:])
        m._capture(run, latents, Step(0, 3, run.scheduler.timesteps[0]), m.routing, 0)
        a, b = set_masks["a"], set_masks["b"]
        assert set(set_masks) == {"a", "b"} and a.shape == (16, 16)
        torch.testing.assert_close(a + b, torch.ones(16, 16))  # a partition (bilinear at the seam)
        assert a[:, :7].eq(1).all() and a[:, 9:].eq(0).all() and a[:, 7].gt(0.5).all() and a[:, 8].lt(0.5).all()


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("restart", [False, True])
def test_tokenroute_with_masks_of_ones_is_unfused_merge(family, restart, files, monkeypatch):
    """One subject LoRA (its mask is all ones) and a global one: the same latents as unfused Merge; two subjects with
    their masks replaced by ones too."""
    from loraloom.composition.methods.tokenroute import TokenRoute

    cp = _pipeline(family, files)
    merge = _gen(cp, ["a", "c"], "merge", fuse=False).latents
    ours = _gen(cp, ["a", "c"], "tokenroute", lora_scale=0.8, restart=restart, concepts={"a": "ohwx"}, roles={"c": "global"})
    assert (ours.latents - merge).abs().max().item() < TOL
    assert ours.extras["masks"]["a"].eq(1).all() and ours.extras["mask_step"] == 0
    assert ours.unet_calls == 3 + 1  # the capture: its own pass of the positive row (restart: its phase 1 is that pass)
    monkeypatch.setattr(TokenRoute, "masks", lambda self, maps, h, w: {l.name: torch.ones(h, w) for l in self.subjects})
    merge3 = _gen(cp, ["a", "b", "c"], "merge", fuse=False).latents
    ours3 = _gen(cp, ["a", "b", "c"], "tokenroute", lora_scale=0.8, restart=restart,
                 concepts={"a": "ohwx", "b": "zorp"}, roles={"c": "global"})
    assert (ours3.latents - merge3).abs().max().item() < TOL
    assert (merge3 - merge).abs().max().item() > 1e-3  # b does something


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_tokenroute_masks_reach_the_transformers_gates(family, files, monkeypatch):
    """Real masks split the image between the two subject LoRAs (their gates on the image tokens): not Merge; masks
    of ones but one 0.999 cell, through the gates, are Merge but for that cell and rounding."""
    from loraloom.composition.methods.tokenroute import TokenRoute

    cp = _pipeline(family, files)
    kw = dict(lora_scale=0.8, concepts={"a": "ohwx", "b": "zorp"}, roles={"c": "global"})
    merge = _gen(cp, ["a", "b", "c"], "merge", fuse=False).latents
    real = _gen(cp, ["a", "b", "c"], "tokenroute", **kw)
    masks = real.extras["masks"]
    assert set(masks) == {"a", "b"} and 0 < masks["a"].mean().item() < 1
    torch.testing.assert_close(masks["a"] + masks["b"], torch.ones_like(masks["a"]))  # hard argmax: a partition
    assert (real.latents - merge).abs().max().item() > 1e-2

    def almost_ones(self, maps, h, w):
        m = torch.ones(h, w)
        m[0, 0] = 0.999
        return {l.name: m for l in self.subjects}

    monkeypatch.setattr(TokenRoute, "masks", almost_ones)
    ours = _gen(cp, ["a", "b", "c"], "tokenroute", **kw).latents
    torch.testing.assert_close(ours, merge, atol=2e-3, rtol=1e-4)
    assert (ours - merge).abs().max().item() > 0


# --- cmlora -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cmlora_runs_without_the_feature_cache_and_equals_its_no_cache_reference(family, files):
    """Default cache_mode 'features' on a transformer: no cache, every LoRA in full at every step; the latents equal
    a diffusers loop (set_adapters) combining the LoRAs' guided predictions with CMLoRA's weights (dominant rotating
    a, b, a: 1.2 / 0.8 for two LoRAs)."""
    ref_pipe = BUILD[family](0)
    for n in ("a", "b"):
        ref_pipe.load_lora_weights(str(files[family][n]), adapter_name=n)
    predict = flux_predict(ref_pipe, PROMPT, 3.5) if family == "flux" else sd3_predict(ref_pipe, PROMPT, 3.5)
    order = []

    def weighted(latents, t):  # composite_reference calls this per LoRA in turn and averages: weight each call
        i = len(order)
        order.append(i)
        step, j = divmod(i, 2)
        w = 1.2 if j == step % 2 else 0.8
        return w * predict(latents, t)

    ref = composite_reference(ref_pipe, ["a", "b"], 1.0, PROMPT, 3, 3.5, weighted)
    cp = _pipeline(family, files, ("a", "b"))
    out = _gen(cp, ["a", "b"], "cmlora", order="given")
    assert out.extras["dominant"] == ["a", "b", "a"] and out.extras["cached_rows"] == 0
    assert out.extras["feature_cache"].startswith("off")
    assert out.extras["full_rows"] == 2 * 2 * 3
    assert (out.latents - ref).abs().max().item() <= TOL
    noise = _gen(cp, ["a", "b"], "cmlora", steps=8, order="given", cache_mode="noise")  # needs no cut: still caches
    assert noise.extras["cached_rows"] > 0 and torch.isfinite(noise.latents).all()


# --- clora --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_clora_runs_on_the_joint_attention(family, files):
    """Two concepts: the contrastive update moves the latents (its loss recorded, finite); one concept with no update
    and threshold 0 (its mask everywhere) is unfused Merge of that LoRA."""
    from loraloom.composition.errors import GenerationError, MethodError

    cp = _pipeline(family, files, ("a", "b"))
    kw = dict(concepts=["ohwx", "zorp"], refine_iterations=0)
    moved = _gen(cp, ["a", "b"], "clora", **kw)
    still = _gen(cp, ["a", "b"], "clora", update_fraction=0.0, **kw)
    assert moved.extras["loss"] and all(torch.isfinite(torch.tensor(v)) for _, v in moved.extras["loss"])
    assert (moved.latents - still.latents).abs().max().item() > 1e-4
    assert moved.extras["masks"][0].shape == (3, *cp.arch.attention_grid((16, 16)))
    one = _gen(cp, ["a"], "clora", concepts=["ohwx"], update_fraction=0.0, mask_threshold=0.0, lora_scale=0.8)
    merge = _gen(cp, ["a"], "merge", fuse=False)
    assert (one.latents - merge.latents).abs().max().item() < TOL
    if family == "flux":
        with pytest.raises((MethodError, GenerationError), match="no negative branch"):
            _gen(cp, ["a", "b"], "clora", reference_mode=True, **kw)
