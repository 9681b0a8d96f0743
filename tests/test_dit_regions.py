"""Regional prompts on FLUX.1 and SD 3/3.5 (tiny pipelines built from config; `pipelines.joint_regions`): one span is
diffusers' own joint attention; one region over the whole image is diffusers' pipeline given that region's prompt
embeddings (pooled: the base prompt's); two half-image regions equal a reference that masks a full score matrix per
prompt and blends; a region's LoRA changes the image-stream layers only inside its region; the refusals."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from dit_references import FLUX_TARGETS, diffusers_latents, write_peft_lora

import loraloom.pipelines.run as run_module
from loraloom.composition.controls import Region
from loraloom.composition.errors import GenerationError
from loraloom.pipelines import ComposedPipeline
from loraloom.pipelines.joint_regions import RegionalJointAttention, regional_joint_modules
from loraloom.pipelines.tiny_dit import build_tiny_flux, build_tiny_sd3

BUILD = {"flux": build_tiny_flux, "sd3": build_tiny_sd3}
GUIDANCE = {"flux": 3.5, "sd3": 5.0}
BASE, LEFT, RIGHT, NEG = "a red cat, ink wash", "a green dog", "a blue bird on a branch", "blurry"
SIZE, STEPS, TOL = 32, 2, 1e-5


@pytest.fixture(scope="module", params=["flux", "sd3"])
def cp(request):
    torch.set_num_threads(1)
    return ComposedPipeline(BUILD[request.param](0))


def generate(cp, prompt=BASE, loras=(), method="merge", **kwargs):
    return cp(prompt, negative_prompt=NEG, loras=list(loras), method=method, num_inference_steps=STEPS, height=SIZE,
              width=SIZE, guidance_scale=GUIDANCE[cp.family], seed=0, output_type="latent", progress_bar=False,
              **kwargs).latents


def test_one_span_is_diffusers_joint_attention(cp):
    """Every regional layer with one prompt span of weight 1 computes what the layer's own processor computes."""
    torch.manual_seed(0)
    transformer = cp.pipe.transformer
    grid, text = (4, 4), 9
    proc = RegionalJointAttention(cp.family, [slice(0, text)], [torch.ones(8, 8)], grid)
    rotary = None
    if cp.family == "flux":
        from diffusers import FluxPipeline

        ids = torch.cat([torch.zeros(text, 3), FluxPipeline._prepare_latent_image_ids(1, *grid, "cpu", torch.float32)])
        rotary = transformer.pos_embed(ids)
    worst = 0.0
    with torch.no_grad():
        for attn in regional_joint_modules(transformer, cp.family):
            dim = attn.to_q.in_features
            x, c = torch.randn(2, grid[0] * grid[1], dim), torch.randn(2, text, dim)
            kw = {"image_rotary_emb": rotary} if rotary is not None else {}
            single = cp.family == "flux" and attn.added_kv_proj_dim is None
            args = (torch.cat([c, x], dim=1), None) if single else (x, c)
            want, got = attn.processor(attn, *args, **kw), proc(attn, *args, **kw)
            want, got = (want,) if torch.is_tensor(want) else want, (got,) if torch.is_tensor(got) else got
            for w, g in zip(want, got, strict=True):
                if g is None:  # SD3's context_pre_only block: its text output is not used
                    assert getattr(attn, "context_pre_only", False)
                    continue
                worst = max(worst, float((w - g).abs().max()))
    print(f"{cp.family} one span vs the layers' own processors: max |diff| {worst:.3g}")
    assert worst <= 1e-6, worst


def test_one_full_region_equals_diffusers_with_its_prompt(cp):
    """One region over the whole image (base_weight 0): diffusers' pipeline given the region prompt's token
    embeddings, the base prompt's pooled embedding and (SD3) the run's negative."""
    pipe = cp.pipe
    ours = generate(cp, regions=[Region("full", prompt=LEFT)])
    if cp.family == "flux":
        embeds, _, _ = pipe.encode_prompt(prompt=[LEFT], prompt_2=None, max_sequence_length=cp.arch.max_sequence_length)
        _, pooled, _ = pipe.encode_prompt(prompt=[BASE], prompt_2=None, max_sequence_length=cp.arch.max_sequence_length)
        ref = diffusers_latents(pipe, None, STEPS, GUIDANCE["flux"], prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    else:
        kw = {"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": True, "negative_prompt": [NEG],
              "max_sequence_length": cp.arch.max_sequence_length}
        embeds, neg, _, neg_pooled = pipe.encode_prompt(prompt=[LEFT], **kw)
        _, _, pooled, _ = pipe.encode_prompt(prompt=[BASE], **kw)
        ref = diffusers_latents(pipe, None, STEPS, GUIDANCE["sd3"], prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                                negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    diff = float((ours - ref).abs().max())
    print(f"{cp.family} one full region vs diffusers: max |diff| {diff:.3g}")
    assert diff <= TOL
    assert (ours - generate(cp)).abs().max() > 1e-3  # the region's prompt, not the base prompt, drew it


class FullMatrixCouple:
    """Reference: per prompt span, the full score matrix over [all text; image] with -inf on the other spans' text
    keys, softmax, blend of the image rows by the region weights (every query, no skipping); text rows from their own
    span's attention."""

    def __init__(self, family, spans, image_weights):
        self.family, self.spans, self.image_weights = family, spans, image_weights  # (n,) per span

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        heads = attn.heads
        text = self.spans[-1].stop

        def split(x):  # (b, s, heads*d) -> (b, heads, s, d)
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        if encoder_hidden_states is None:  # FLUX single-stream: [text; image] in hidden_states
            q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
            q, k = attn.norm_q(q), attn.norm_k(k)  # RMSNorm over each head's channels
        else:
            qi, ki, vi = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
            qt = split(attn.add_q_proj(encoder_hidden_states))
            kt, vt = split(attn.add_k_proj(encoder_hidden_states)), split(attn.add_v_proj(encoder_hidden_states))
            norms = [(attn.norm_q, qi), (attn.norm_k, ki), (attn.norm_added_q, qt), (attn.norm_added_k, kt)]
            qi, ki, qt, kt = (x if n is None else n(x) for n, x in norms)
            q, k, v = torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2)  # text first, both families
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        out = torch.zeros_like(q)
        for span, w in zip(self.spans, self.image_weights, strict=True):
            other = torch.zeros(k.shape[2], dtype=torch.bool)  # the other spans' text keys
            other[:text] = True
            other[span] = False
            o = scores.masked_fill(other, float("-inf")).softmax(-1) @ v
            out[:, :, span] = o[:, :, span]
            out[:, :, text:] += o[:, :, text:] * w.view(1, 1, -1, 1)
        out = out.transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out
        txt, img = out[:, :text], out[:, text:]
        img = attn.to_out[1](attn.to_out[0](img))
        if getattr(attn, "context_pre_only", False):
            return img, None
        return img, attn.to_add_out(txt)


@pytest.mark.parametrize("base_weight", [0.0, 0.25])
def test_two_half_regions_equal_a_masked_full_matrix_reference(cp, monkeypatch, base_weight):
    regions = [Region("left", prompt=LEFT), Region("right", prompt=RIGHT)]
    ours = generate(cp, regions=regions, base_weight=base_weight)
    captured = {}

    @contextmanager
    def reference(transformer, family, spans, weights, grid):
        gh, gw = grid
        left = (torch.arange(gw) < gw // 2).float().expand(gh, gw).reshape(-1)  # the left half of the token grid
        image_weights = [torch.full((gh * gw,), base_weight), left * (1 - base_weight), (1 - left) * (1 - base_weight)]
        captured["weights"] = [w.clone() for w in weights]
        proc = FullMatrixCouple(family, spans, image_weights)
        mods = regional_joint_modules(transformer, family)
        saved = [m.processor for m in mods]
        for m in mods:
            m.set_processor(proc)
        try:
            yield proc
        finally:
            for m, p in zip(mods, saved, strict=True):
                m.set_processor(p)

    monkeypatch.setattr(run_module, "regional_joint_attention", reference)
    ref = generate(cp, regions=regions, base_weight=base_weight)
    monkeypatch.undo()
    assert len(captured["weights"]) == 3
    diff = float((ours - ref).abs().max())
    print(f"{cp.family} two half regions (base_weight {base_weight}) vs full-matrix reference: max |diff| {diff:.3g}")
    assert diff <= TOL
    for prompt in (BASE, LEFT, RIGHT):
        assert (ours - generate(cp, prompt=prompt)).abs().max() > 1e-3


def test_region_lora_acts_on_image_tokens_inside_its_region_only(tmp_path):
    """FLUX, first transformer call of a regional run with and without a LoRA bound to the left region (attention
    projections, and CLIP layers): the first block's image projections (same input in both runs) differ only on the
    left half's tokens; its text projections are the base model's on every prompt span (the text stream takes the
    mask's smallest value, 0); the pooled embedding is the base prompt's, which the region LoRA does not touch."""
    torch.set_num_threads(1)
    cp = ComposedPipeline(build_tiny_flux(0))
    cp.load_lora(write_peft_lora(cp.pipe, tmp_path, "r", seed=3, targets=FLUX_TARGETS[:8], std=0.3))
    paths = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"]
    mods = dict(cp.pipe.transformer.named_modules())

    def first_outputs(loras, region_loras):
        seen, pooled = {}, {}

        def keep(store, key, value):  # the first call's value; the hook returns None (changes nothing)
            store.setdefault(key, value.detach().clone())

        hooks = [mods[p].register_forward_hook(lambda m, i, o, p=p: keep(seen, p, o)) for p in paths]
        hooks.append(cp.pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: keep(pooled, "p", kw["pooled_projections"]), with_kwargs=True))
        try:
            latents = generate(cp, loras=loras, regions=[Region("left", prompt=LEFT, loras=region_loras),
                                                         Region("right", prompt=RIGHT)])
        finally:
            for h in hooks:
                h.remove()
        return seen, pooled["p"], latents

    with_lora, pooled_with, lat_with = first_outputs(["r"], ("r",))
    without, pooled_without, lat_without = first_outputs([], ())
    assert torch.equal(pooled_with, pooled_without)
    gh, gw = SIZE // 4, SIZE // 4  # the packed token grid
    inside = (torch.arange(gw) < gw // 2).expand(gh, gw).reshape(-1)
    for p in paths[:3]:
        d = (with_lora[p] - without[p]).abs().amax(-1)[0]
        assert float(d[~inside].max()) == 0.0, p
        assert float(d[inside].min()) > 1e-4, p
    for p in paths[3:]:
        assert torch.equal(with_lora[p], without[p]), p
    assert (lat_with - lat_without).abs().max() > 1e-4


def test_regions_with_a_method_without_regions_are_refused(cp):
    with pytest.raises(GenerationError, match="method 'klora' has no meaning for regions or masked LoRAs") as err:
        generate(cp, method="klora", regions=[Region("left", prompt=LEFT)])
    assert "\n" not in str(err.value)
