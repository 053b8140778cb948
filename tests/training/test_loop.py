"""One worker's training loop in-process, on the cached tiny data: learning, the frozen base,
gradient checkpointing, accumulation and checkpoint round trips."""

import itertools

import pytest
import torch

from ifadapter import diffusion_loss
from tests.conftest import open_gates
from training.loop import AdapterTrainer, checkpoint_with_conditioning
from training.samples import BatchPlan, CachedSamples

CPU = torch.device("cpu")


@pytest.fixture
def single_thread():
    """One torch thread: two threads on two shared cores spend their time waiting for each
    other on tiny operations."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixed_loss(trainer: AdapterTrainer, images: list[int]) -> float:
    """The loss on fixed noise and timesteps, without dropout."""
    batch = trainer.samples.collate(images, epoch=0)
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(images))]
    with torch.no_grad():
        return diffusion_loss(
            trainer.adapter, trainer.unet, trainer.noise_scheduler, batch, 0.0, 0.0, generators
        ).item()


def test_overfitting_lowers_the_loss_and_moves_only_the_adapter(
    tiny_cache, train_config, single_thread
):
    config = train_config(
        batch_size=4, lr=1e-2, warmup_steps=0, drop_local=0.0, drop_global=0.0, ema_decay=None
    )
    trainer = AdapterTrainer(config, CachedSamples(tiny_cache.path), CPU)
    assert not trainer.unet.training and not any(p.requires_grad for p in trainer.unet.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.adapter.parameters()}
    base = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    adapter = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
    square = [i for i, image_id in enumerate(trainer.samples.image_ids) if "wide" not in image_id]
    before = fixed_loss(trainer, square[:8])
    for step in range(40):
        trainer.step(step)
    after = fixed_loss(trainer, square[:8])
    assert after < 0.95 * before, (before, after)
    for key, value in trainer.unet.state_dict().items():
        assert torch.equal(value, base[key]), key  # bit-identical base
    moved = [k for k, v in trainer.adapter.state_dict().items() if not torch.equal(v, adapter[k])]
    assert any(".gate" in k for k in moved) and any("resampler" in k for k in moved)
    assert any("to_k_ap" in k for k in moved) and any("box_embedding" in k for k in moved)


def test_gradient_checkpointing_replays_the_adapter_conditioning(
    tiny_cache, train_config, single_thread
):
    samples = CachedSamples(tiny_cache.path)
    batch = samples.collate([0, 1, 2], epoch=0)

    def gradients(checkpointing) -> dict[str, torch.Tensor]:
        trainer = AdapterTrainer(train_config(gradient_checkpointing=False), samples, CPU)
        open_gates(trainer.adapter, 0.5)  # closed gates pass no gradient beyond themselves
        if checkpointing is not None:
            trainer.unet.enable_gradient_checkpointing(checkpointing(trainer.adapter))
        generators = [torch.Generator().manual_seed(i) for i in range(3)]
        loss = diffusion_loss(
            trainer.adapter, trainer.unet, trainer.noise_scheduler, batch, 0.0, 0.0, generators
        )
        loss.backward()
        return {n: p.grad for n, p in trainer.adapter.named_parameters()}

    plain, replayed = gradients(None), gradients(checkpoint_with_conditioning)
    assert plain.keys() == replayed.keys() and all(g is not None for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(replayed[name], grad, msg=name)
    # diffusers' own checkpointing recomputes the ISM layers without their conditioning.
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        gradients(lambda adapter: None)


def test_accumulation_trains_as_the_whole_batch(tiny_cache, train_config, single_thread):
    samples = CachedSamples(tiny_cache.path)
    whole = AdapterTrainer(train_config(batch_size=4), samples, CPU)
    split = AdapterTrainer(train_config(batch_size=2, gradient_accumulation=2), samples, CPU)
    for step in range(3):
        losses = whole.step(step).loss, split.step(step).loss
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, value), other in zip(
        whole.adapter.state_dict().items(), split.adapter.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_restored_trainer_continues_exactly(tiny_cache, train_config, tmp_path, single_thread):
    config = train_config(batch_size=2, warmup_steps=3, ema_decay=0.9, lr=1e-3)
    samples = CachedSamples(tiny_cache.path)
    first = AdapterTrainer(config, samples, CPU)
    for step in range(3):
        first.step(step)
    first.save(tmp_path, step=3)
    expected = [first.step(step) for step in (3, 4)]

    torch.manual_seed(123)  # the restore brings the RNG state back as well
    second = AdapterTrainer(config, samples, CPU)
    assert second.load(tmp_path) == 3
    resumed = [second.step(step) for step in (3, 4)]
    assert [m.loss for m in resumed] == [m.loss for m in expected]
    assert [m.lr for m in resumed] == [m.lr for m in expected]
    for key, value in first.adapter.state_dict().items():
        assert torch.equal(second.adapter.state_dict()[key], value), key
    for mine, theirs in zip(second.ema.shadow_params, first.ema.shadow_params, strict=True):
        assert torch.equal(mine, theirs)
    (tmp_path / "final").mkdir()
    first.export(tmp_path / "final" / "adapter")
    assert (tmp_path / "final" / "adapter" / "ifadapter.safetensors").is_file()


def test_batch_plan_is_a_function_of_seed_and_step():
    buckets = [0] * 10 + [1] * 5
    plan = BatchPlan(buckets, global_batch=4, seed=7)
    assert plan.batches_per_epoch == 3  # 2 from the ten, 1 from the five; remainders wait
    again = BatchPlan(buckets, global_batch=4, seed=7)
    for step in range(7):
        epoch, images = plan.global_batch_at(step)
        assert epoch == step // 3
        assert len({buckets[i] for i in images}) == 1
        assert (images == again.global_batch_at(step)[1]).all()
        halves = [plan.micro_batch(step, 0, rank, 2, 2)[1] for rank in (0, 1)]
        assert (torch.tensor(list(halves[0]) + list(halves[1])) == torch.tensor(images)).all()
    seen = {int(i) for step in range(3) for i in plan.global_batch_at(step)[1]}
    assert len(seen) == 12
    first = [g.initial_seed() for g in plan.generators(5, range(0, 4))]
    assert first[2:] == [g.initial_seed() for g in plan.generators(5, range(2, 4))]
    with pytest.raises(ValueError, match="no aspect bucket holds a global batch of 16"):
        BatchPlan(buckets, global_batch=16, seed=0)


def test_cosine_schedule_warms_up_then_decays_to_zero_and_enters_the_trajectory(train_config):
    from training.loop import lr_factor

    config = train_config(warmup_steps=10, max_steps=110, lr_schedule="cosine")
    factors = [lr_factor(config, step) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[-1] < 0.001
    constant = train_config(warmup_steps=10, max_steps=110)
    assert lr_factor(constant, 100) == 1.0
    # A cosine run's path depends on where it ends; a constant one's does not.
    assert config.trajectory()["max_steps"] == 110
    assert "max_steps" not in constant.trajectory()
