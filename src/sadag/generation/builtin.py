"""The built-in generation methods, registered by name: noise, zeroq, genie, sadag.

Each one owns its checkpoint names (``ctx.save_state``) and its artifacts; nothing outside this module knows them.
Under torchrun (``ctx.ranks``) Genie-D and ZeroQ split their batches over the ranks (batch b on rank
b % world_size; each batch is seeded from (seed, b) alone, so the set is the one process's), then every batch
is broadcast from its owner; noise is cheap and made whole on every rank; SADAG's refinement is sequential
(docs/distributed.md).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..config import GenConfig, bits_label
from ..distributed import agree, barrier, broadcast_tensors, main_value, share_items
from ..errors import ConfigError
from ..files import file_digest
from ..methods import register_method
from ..rundir import pin_input
from .context import GenerationContext
from .genie import GenieBatch, auto_parallel_batches, batch_sizes, generate_genie
from .io import images_digest, load_synthetic_set
from .noise import generate_noise
from .sadag import RefineCheckpoints, refine_sadag
from .zeroq import generate_zeroq

GENIE_BATCHES = "genie_batches"  # artifact of a Genie set: each batch's generator state and latents
GENIE_SET_DIGEST = "genie_set_digest"  # artifact of a set made from a saved Genie set: that set's images_digest
WARMUP_MODEL = "warmup"  # SADAG publishes its stage-B model as warmup.safetensors
GENIE_STEP, REFINE_STEP = "genie_step.pt", "refine_step.pt"  # the Genie-D group / SADAG batch in progress
# the batch in progress is saved at most every 5 minutes, and saving kept under 5% of the time (CheckpointClock)
MID_BATCH_SECONDS = 300.0


def batch_to_state(batch: GenieBatch, images: bool = True) -> dict[str, Any]:
    """A GenieBatch as tensors and plain containers (checkpoints and saved sets never pickle classes)."""
    state = {"index": batch.index, "generator_state": dict(batch.generator_state), "z": batch.z}
    return {**state, "images": batch.images} if images else state


def batch_from_state(state: dict[str, Any], images: Tensor | None = None) -> GenieBatch:
    return GenieBatch(int(state["index"]), dict(state["generator_state"]), state["z"],
                      state["images"] if images is None else images)


@register_method("noise", help="Gaussian noise in the model's normalized input space")
def noise(ctx: GenerationContext) -> Tensor:
    with ctx.stage("generate"):
        return generate_noise(ctx.spec, ctx.gen.num_images, ctx.seed)


@register_method("zeroq", help="ZeroQ: pixels optimized to match the BatchNorm statistics")
def zeroq(ctx: GenerationContext) -> Tensor:
    with ctx.stage("generate"):
        if not ctx.ranks.enabled:
            return generate_zeroq(ctx.model, ctx.spec, ctx.gen, ctx.seed, progress=ctx.progress)
        sizes = batch_sizes(ctx.gen.num_images, ctx.gen.batch_size)
        mine = ctx.ranks.owned(range(len(sizes)))
        local = {}
        if mine:
            made = generate_zeroq(ctx.model, ctx.spec, ctx.gen, ctx.seed, progress=ctx.progress, only=mine)
            local = {b: {"images": x} for b, x in zip(mine, made.split([sizes[b] for b in mine]), strict=True)}
        shared = share_items(local, range(len(sizes)), ctx.ranks, ctx.device)
        return torch.cat([shared[b]["images"] for b in range(len(sizes))])


def _batch_tensors(batch: GenieBatch) -> dict[str, Tensor]:
    """A GenieBatch as one flat dict of tensors (what share_items sends)."""
    state = {f"generator.{k}": v for k, v in batch.generator_state.items()}
    return {"index": torch.tensor(batch.index), "z": batch.z, "images": batch.images, **state}


def _batch_from_tensors(t: dict[str, Tensor]) -> GenieBatch:
    state = {k.removeprefix("generator."): v for k, v in t.items() if k.startswith("generator.")}
    return GenieBatch(int(t["index"]), state, t["z"], t["images"])


def genie_batches(ctx: GenerationContext) -> list[GenieBatch]:
    """Genie-D, checkpointed per batch."""
    count = len(batch_sizes(ctx.gen.num_images, ctx.gen.batch_size))
    with ctx.stage("generate"):
        found = {k: ctx.load_state(f"genie_batch_{k}.pt") for k in range(count)}
        done = {k: batch_from_state(v) for k, v in found.items() if v is not None}
        if ctx.ranks.enabled and ctx.gen.bn_scope == "set":  # refused on every rank alike: none waits
            raise ConfigError("gen.bn_scope 'set' matches statistics over the whole set in one process: run it "
                              "without torchrun (make the set once with `sadag generate` and pass --genie-set)")
        if ctx.ranks.enabled:
            # also a barrier: every rank has read the checkpoints before rank 0 writes new ones
            agree(sorted(done), "finished Genie-D batches", ctx.ranks, ctx.device)
            return _genie_sharded(ctx, done, count)
        batches = generate_genie(ctx.model, ctx.spec, ctx.gen, ctx.seed, done=done, progress=ctx.progress,
                                 on_batch=lambda b: ctx.save_state(f"genie_batch_{b.index}.pt", batch_to_state(b)),
                                 on_state=lambda s: ctx.save_state(GENIE_STEP, s),
                                 resume_state=ctx.load_state(GENIE_STEP), state_every=1,
                                 state_seconds=MID_BATCH_SECONDS)
        ctx.drop_state(GENIE_STEP)  # every batch is saved whole: the last group's mid-stage state is stale
        return batches


def _genie_sharded(ctx: GenerationContext, done: dict[int, GenieBatch], count: int) -> list[GenieBatch]:
    """Genie-D over torchrun's ranks, in rounds of world_size groups: each rank makes its batches of the round,
    then every rank receives them all and rank 0 checkpoints them (a kill loses at most one round)."""
    ranks, gen = ctx.ranks, ctx.gen
    # rank 0's choice: every rank must make the same rounds (a GPU's memory may differ between machines)
    parallel = main_value(gen.parallel_batches or auto_parallel_batches(ctx.model, ctx.spec, gen.batch_size, count),
                          ranks, ctx.device)
    finished, step = dict(done), ranks.world_size * parallel
    for start in range(0, count, step):
        todo = list(range(start, min(start + step, count)))  # a round is made again whole unless all of it is done
        if all(b in done for b in todo):
            continue
        mine = ranks.owned(todo)
        made = generate_genie(ctx.model, ctx.spec, gen, ctx.seed, done=done, progress=ctx.progress,
                              only=mine) if mine else []
        shared = share_items({b.index: _batch_tensors(b) for b in made}, todo, ranks, ctx.device)
        for b in todo:
            finished[b] = _batch_from_tensors(shared[b])
            ctx.save_state(f"genie_batch_{b}.pt", batch_to_state(finished[b]))
    return [finished[b] for b in range(count)]


# the settings that shape what Genie-D made (sizes and latents are checked on the batches themselves)
GENIE_D_SETTINGS = ("genie_iters", "lr_z", "lr_g", "g_decay", "g_decay_every", "plateau_patience", "min_lr_z",
                    "swing", "precision", "bn_scope")


def _check_genie_d_settings(path: str, meta: dict[str, Any], gen: GenConfig, seed: int) -> None:
    """A run that reuses a set records its own gen settings and seed: they must be the ones the set was made with,
    or the run would claim a Genie-D it did not run (a set saved before a setting existed is not checked on it)."""
    made = meta.get("gen") or {}
    diff = [f"gen.{k} {made[k]!r} in the set, {getattr(gen, k)!r} in this run" for k in GENIE_D_SETTINGS
            if k in made and made[k] != getattr(gen, k)]
    if "seed" in meta and meta["seed"] != seed:  # Genie-D's latents and generators are seeded from it
        diff.append(f"seed {meta['seed']!r} in the set, {seed!r} in this run")
    if diff:
        raise ConfigError(f"gen.genie_set (--genie-set): {path} was made with other Genie-D settings "
                          f"({'; '.join(diff)}): give this run the set's values (its config.yaml), or make a set "
                          "with this run's")


@register_method("genie", help="Genie-D: a generator and latents per batch, trained to match BatchNorm statistics")
def genie(ctx: GenerationContext) -> Tensor:
    # a saved set is reused as is: what a run adds to it (--lowpass) is then the only difference, paired exactly
    batches = genie_set_batches(ctx) if ctx.gen.genie_set else genie_batches(ctx)
    ctx.artifacts[GENIE_BATCHES] = [batch_to_state(b, images=False) for b in batches]
    return torch.cat([b.images for b in batches])


def genie_set_batches(ctx: GenerationContext) -> list[GenieBatch]:
    """The Genie-D batches of a set saved by the genie method (``gen.genie_set``), checked against this run."""
    path = ctx.gen.genie_set
    images, info = load_synthetic_set(path)
    states, meta = info["artifacts"].get(GENIE_BATCHES), info["meta"]
    # pinned first: on resume, a set made again at this path is named as such, whatever else about it changed
    digest = images_digest(images)
    pin_input(ctx, "gen.genie_set", digest, f"gen.genie_set (--genie-set) {path}")
    if not states:
        raise ConfigError(f"gen.genie_set (--genie-set): {path} holds no Genie-D batches; make it with `sadag "
                          "generate --method genie`")
    if meta.get("model") not in (None, ctx.cfg.model):
        raise ConfigError(f"gen.genie_set (--genie-set): {path} was generated for model {meta['model']!r}, this run "
                          f"is for {ctx.cfg.model!r}")
    if ((meta.get("gen") or {}).get("lowpass") or 0) > 0:  # its images are not its generators' any more
        raise ConfigError(f"gen.genie_set (--genie-set): {path} was low-pass filtered when it was made (gen.lowpass "
                          f"{meta['gen']['lowpass']}); a Genie set is reused as Genie-D made it: make it without "
                          "--lowpass and give --lowpass to the run that reuses it")
    _check_genie_d_settings(path, meta, ctx.gen, ctx.seed)
    sizes = batch_sizes(ctx.gen.num_images, ctx.gen.batch_size)
    found = [int(s["z"].shape[0]) for s in states]
    if found != sizes or images.shape[0] != sum(sizes):
        raise ConfigError(f"gen.genie_set (--genie-set): {path} has batches of {found} images, this run asks for "
                          f"{sizes} (gen.num_images {ctx.gen.num_images}, gen.batch_size {ctx.gen.batch_size}): "
                          "set them to the set's values")
    if states[0]["z"].shape[1] != ctx.gen.latent_dim:
        raise ConfigError(f"gen.genie_set (--genie-set): {path} has latents of size {states[0]['z'].shape[1]}, "
                          f"gen.latent_dim is {ctx.gen.latent_dim}")
    ctx.artifacts[GENIE_SET_DIGEST] = digest
    parts = images.split(sizes)
    return [batch_from_state(s, parts[i]) for i, s in enumerate(states)]


def load_warmup_model(ctx: GenerationContext) -> nn.Module:
    """``gen.warmup_model``: a quantized.safetensors of this run's model at this run's bits."""
    from ..export import load_quantized

    path = ctx.gen.warmup_model
    qmodel, meta = load_quantized(path, model=copy.deepcopy(ctx.model))
    pin_input(ctx, "gen.warmup_model", file_digest(path)[:16], f"gen.warmup_model (--warmup-model) {path}")
    wanted, found = bits_label(ctx.cfg.quant), f"{meta.get('w_bits')}/{meta.get('a_bits') or 'fp'}"
    if meta.get("model_name") != ctx.cfg.model or found != wanted:
        raise ConfigError(f"gen.warmup_model (--warmup-model): {path} is {meta.get('model_name')!r} at W/A {found}; "
                          f"this run needs {ctx.cfg.model!r} at {wanted}")
    return qmodel.to(ctx.device)


def _warmup_model(ctx: GenerationContext, warmup_images: Tensor) -> nn.Module:
    if ctx.gen.warmup_model:
        return load_warmup_model(ctx)
    if ctx.calibrate is None:
        raise ConfigError("SADAG needs a warm-up quantized model: run it through sadag.run / sadag.generate_set, "
                          "or set gen.warmup_model")
    with ctx.stage("warmup_calibrate"):  # SADAG stage B
        q_warm = ctx.calibrate(warmup_images, ctx.gen.warmup_calib_iters, "warmup_calib.pt")
    if ctx.publish is not None:
        ctx.publish(WARMUP_MODEL, q_warm)
    return q_warm


@register_method("sadag", help="SADAG: Genie-D, a warm-up quantized model, then sharpness-aware refinement")
def sadag(ctx: GenerationContext) -> Tensor:
    batches = genie_set_batches(ctx) if ctx.gen.genie_set else genie_batches(ctx)
    warmup = torch.cat([b.images for b in batches]).to(ctx.device)
    q_warm = _warmup_model(ctx, warmup)
    with ctx.stage("refine"):  # SADAG stage C
        found = {b.index: ctx.load_state(f"refined_{b.index}.pt") for b in batches}
        barrier(ctx.ranks)  # every rank has read the checkpoints before rank 0 writes new ones
        # sequential (batch k's diversity term needs batches < k): every rank refines the same batches, so no
        # rank waits for another in a collective, then all take rank 0's set (bit-equal where kernels differ)
        checkpoints = RefineCheckpoints(lambda s: ctx.save_state(REFINE_STEP, s), 1, ctx.load_state(REFINE_STEP),
                                        MID_BATCH_SECONDS)
        images = refine_sadag(ctx.model, q_warm, batches, ctx.spec, ctx.gen, ctx.seed,
                              done={k: v for k, v in found.items() if v is not None},
                              on_batch=lambda k, entry: ctx.save_state(f"refined_{k}.pt", entry),
                              progress=ctx.progress, checkpoints=checkpoints)
        ctx.drop_state(REFINE_STEP)  # every refined batch is saved whole
        if not ctx.ranks.enabled:
            return images
        return broadcast_tensors({"images": images} if ctx.ranks.is_main else None, 0, ctx.ranks,
                                 ctx.device)["images"]
