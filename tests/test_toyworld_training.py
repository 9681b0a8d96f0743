"""The one training loop of the toy-world stages (`training.TrainingLoop`): a run interrupted after a checkpoint and
resumed ends bit for bit where an uninterrupted run ends, it continues from the checkpoint's step (not from 0),
and it draws no random numbers of its own."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loraloom.evaluation.toyworld.training import EMA, Checkpoint, ParamList, TrainingLoop, cosine_lr, step_generator


class Interrupted(Exception):
    pass


def _linear_loop(folder, steps: int = 7):
    """A tiny model with every part a stage may checkpoint: parameters as a list, optimiser, EMA."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    ema = EMA(params, 0.9)
    loop = TrainingLoop("test", folder, steps, opt, params, {"params": ParamList(params), "opt": opt, "ema": ema},
                        lr=0.1, warmup=2, final_lr=0.02, checkpoint_every=2, ema=ema)
    return net, loop


def _step(net, calls: list, stop_at: int | None = None):
    def step(k: int) -> dict[str, torch.Tensor]:
        if k == stop_at:
            raise Interrupted(k)
        calls.append(k)
        g = step_generator(5, k)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
        return {"loss": torch.nn.functional.mse_loss(net(x), y)}

    return step


def _state(net, loop) -> list[torch.Tensor]:
    opt = [t for s in loop.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in net.parameters()] + opt + loop.ema.shadow


def test_interrupted_and_resumed_equals_uninterrupted_and_continues_from_the_checkpoint(tmp_path):
    net, loop = _linear_loop(tmp_path / "straight")
    calls: list[int] = []
    loop.run(_step(net, calls), progress=False)
    assert calls == list(range(7))
    straight = _state(net, loop)

    net, loop = _linear_loop(tmp_path / "resumed")
    with pytest.raises(Interrupted):
        loop.run(_step(net, [], stop_at=5), progress=False)
    assert Checkpoint(tmp_path / "resumed").load()["step"] == 4  # every 2 steps: step 4 is redone after the stop
    net, loop = _linear_loop(tmp_path / "resumed")  # a fresh process: new model, optimiser and EMA
    calls = []
    loop.run(_step(net, calls), progress=False)
    assert calls == [4, 5, 6]
    resumed = _state(net, loop)
    assert len(resumed) == len(straight) > 2
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert Checkpoint(tmp_path / "resumed").load()["step"] == 7  # the last step is always saved


def test_the_learning_rate_follows_the_cosine_with_warm_up_and_the_loop_draws_no_random_numbers(tmp_path):
    net, loop = _linear_loop(tmp_path, steps=5)
    seen = []
    inner = _step(net, [])

    def step(k):
        seen.append(loop.optimizer.param_groups[0]["lr"])  # the rate of step k - 1 (set after the forward)
        return inner(k)

    before = torch.random.get_rng_state()
    loop.run(step, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert seen[1:] == [cosine_lr(k, 5, 0.1, 2, 0.02) for k in range(4)]
    assert loop.optimizer.param_groups[0]["lr"] == cosine_lr(4, 5, 0.1, 2, 0.02)


def test_a_real_stage_resumed_writes_the_same_lora_file(tmp_path, monkeypatch):
    """The LoRA stage on the shipped model (tiny settings): stopped after a checkpoint, run again, it trains only the
    remaining steps and writes the tensors an uninterrupted run writes."""
    from safetensors.torch import load_file

    from loraloom.evaluation.toyworld import MODEL
    from loraloom.evaluation.toyworld import scenes as S
    from loraloom.evaluation.toyworld import trainers as T
    from loraloom.evaluation.toyworld.recipe import Recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = replace(Recipe(), lora_steps=5, lora_batch=2, lora_pool=4, checkpoint_every=2, lora_overrides={})
        spec = S.LORA_BY_ID["style_1"]
        straight = T.train_lora(T.Paths(tmp_path / "a", tmp_path / "a" / "assets", model=MODEL), recipe, spec,
                                progress=False)

        paths = T.Paths(tmp_path / "b", tmp_path / "b" / "assets", model=MODEL)
        calls: list[int] = []
        original = T.lora_step

        def stop_at_3(step, **kw):
            if step == 3:
                raise Interrupted(step)
            return original(step, **kw)

        monkeypatch.setattr(T, "lora_step", stop_at_3)
        with pytest.raises(Interrupted):
            T.train_lora(paths, recipe, spec, progress=False)
        monkeypatch.setattr(T, "lora_step", lambda step, **kw: (calls.append(step), original(step, **kw))[1])
        resumed = T.train_lora(paths, recipe, spec, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert calls == [2, 3, 4]
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
