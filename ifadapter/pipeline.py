"""``IFAdapterSDXLPipeline``: the stock SDXL pipeline plus instances.

It is a thin subclass: the denoising loop, schedulers, LoRA loading (``load_lora_weights``),
``from_pretrained`` / ``from_single_file`` and everything else are diffusers' own. Without an
adapter, or without instances, a call is the stock ``__call__`` with the same arguments. With
instances, what it adds happens around the stock ``__call__``: the instance descriptions are
encoded and turned into appearance tokens once, the adapter wraps the processors the UNet holds
at that moment (whatever stock feature or user set them) for the call only, the ISM layers get
the conditioning for the whole generation (the unconditional branch of guidance keeps only the
box embedding, or nothing), and a step-end callback switches the adapter off after the
``control_ratio`` fraction of the steps. docs/pipeline.md lists how each stock feature fares.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from ifadapter.adapter import TOKEN_GROUPS, IFAdapter, cast, one_dtype
from ifadapter.attention_processor import InstanceConditioning
from ifadapter.layout import Instance, Layout, LayoutTensors
from ifadapter.text import encode_instances

# What the unconditional branch of classifier-free guidance keeps of the layout: "boxes" (each
# instance's box embedding, as the released code and the training's condition dropout do), or
# "none" (the adapter is off there, so guidance amplifies the layout as well as the caption).
UnconditionalLayout = Literal["boxes", "none"]

Instances = Sequence[Instance | dict] | Sequence[Sequence[Instance | dict]]


class IFAdapterSDXLPipeline(StableDiffusionXLPipeline):
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "adapter"]  # noqa: RUF012
    # Model CPU offload moves a component onto the accelerator when its forward() runs; the
    # adapter is used through its methods, so it stays on the accelerator instead (it is small
    # beside the UNet).
    _exclude_from_cpu_offload = [*StableDiffusionXLPipeline._exclude_from_cpu_offload, "adapter"]  # noqa: RUF012

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        adapter: IFAdapter | None = None,
    ) -> None:
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        if adapter is not None:
            adapter.check_unet(unet)
            _follow(adapter, unet)
        self.register_modules(adapter=adapter)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs
    ) -> IFAdapterSDXLPipeline:
        """The stock loader, with one dtype for every component: ``dtype`` (diffusers' current
        name) or ``torch_dtype`` (its older one), else float32.

        The stock default keeps each library's habit: transformers loads the text encoders in
        the dtype they were stored in, diffusers the UNet and VAE in float32, so a checkpoint
        stored in float16 (the shipped toy base, most SDXL checkpoints) loads as a mixture that
        fails at the first matmul. float32 is the CPU's precision (where loading puts the
        weights); a GPU user asks for float16 or bfloat16. An adapter passed as ``adapter=``
        follows the UNet's dtype and device."""
        dtype = one_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        kwargs["dtype"] = dtype or torch.float32
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def set_adapter(self, adapter: IFAdapter | None) -> None:
        """Attaches, replaces or (None) removes the adapter, moved to the UNet's device and
        dtype. Nothing on the UNet changes: the adapter wraps its processors during each call
        with instances only."""
        if adapter is not None:
            adapter.check_unet(self.unet)
            _follow(adapter, self.unet)
        self.register_modules(adapter=adapter)

    def layouts(self, prompt: str | Sequence[str], instances: Instances | None) -> list[Layout]:
        """Validated layouts: one prompt with a list of instances, or a list of each."""
        if isinstance(prompt, str):
            prompt, instances = [prompt], [instances or []]
        elif instances is None:
            instances = [[] for _ in prompt]
        if len(instances) != len(prompt):
            raise ValueError(f"{len(prompt)} prompts but {len(instances)} instance lists")
        layouts = []
        for index, (caption, items) in enumerate(zip(prompt, instances, strict=True)):
            try:
                layouts.append(Layout(caption=caption, instances=list(items)))
            except ValueError as error:
                raise ValueError(f"prompt {index}: {error}") from None
        return layouts

    @torch.no_grad()
    def instance_conditioning(
        self,
        layouts: Sequence[Layout],
        latent_size: tuple[int, int],
        num_images_per_prompt: int,
        guidance: bool,
        token_groups: Collection[str] = TOKEN_GROUPS,
        unconditional_layout: UnconditionalLayout = "boxes",
    ) -> InstanceConditioning:
        """The conditioning of a whole generation, in the UNet batch order of the stock pipeline:
        [unconditional, conditional] when guiding, each prompt repeated per image."""
        if unconditional_layout not in ("boxes", "none"):
            raise ValueError(
                f"unconditional_layout must be 'boxes' or 'none', got {unconditional_layout!r}"
            )
        tensors = LayoutTensors.from_layouts(layouts)
        # The execution device, not the encoders': under sequential CPU offload their weights
        # sit on the meta device between forwards.
        features = encode_instances(
            [self.tokenizer, self.tokenizer_2],
            [self.text_encoder, self.text_encoder_2],
            tensors,
            self.adapter.config.text_encoder_layers,
            self._execution_device,
        ).to(self.adapter.device, self.adapter.dtype)
        features = features.repeat_interleave(num_images_per_prompt)
        tokens = self.adapter.instance_tokens(features, token_groups=token_groups)
        boxes, mask = features.boxes, features.mask
        if guidance:
            unconditional = self.adapter.instance_tokens(
                features,
                keep_local=torch.zeros(features.batch_size, device=self.adapter.device),
                token_groups=token_groups,
            )
            tokens = torch.cat([unconditional, tokens])
            # No instance in a row: its cells get no instance semantic map at all.
            unconditional_mask = mask if unconditional_layout == "boxes" else torch.zeros_like(mask)
            boxes, mask = torch.cat([boxes, boxes]), torch.cat([unconditional_mask, mask])
        return self.adapter.conditioning(tokens, boxes, mask, latent_size)

    def _layouts_for_call(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        instances: Instances,
    ) -> list[Layout]:
        """The layouts of a call; with ``prompt_embeds`` instead of text, one layout per row of
        the embeddings, whose captions stay empty (only the instances are read)."""
        if isinstance(instances, str) or any(isinstance(item, str) for item in instances):
            raise TypeError(
                "instances must be Instance or {'box', 'caption'} items (a list of them per "
                "prompt), not text; the stock parameters after `instances`, such as prompt_2, "
                "are keyword-only here"
            )
        if prompt is not None:
            return self.layouts(prompt, instances)
        if prompt_embeds is None:
            raise ValueError("pass `prompt` or `prompt_embeds`")
        rows = prompt_embeds.shape[0]
        flat = all(isinstance(item, (Instance, dict)) for item in instances)
        if rows == 1 and flat:
            return self.layouts("", instances)
        return self.layouts([""] * rows, instances)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        instances: Instances | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock's)
        control_ratio: float = 1.0,
        token_groups: Collection[str] = TOKEN_GROUPS,
        unconditional_layout: UnconditionalLayout = "boxes",
        **kwargs,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generates ``prompt`` with ``instances`` (a list per prompt for a batch of prompts).

        Every parameter from ``prompt_2`` to ``callback_on_step_end_tensor_inputs`` (and
        ``**kwargs``) is the stock ``StableDiffusionXLPipeline.__call__``'s, with its default,
        keyword-only here because ``instances`` takes the second place. The global prompt may
        be text or embeddings (``prompt_embeds`` etc.; the instances then come as one list per
        row of ``prompt_embeds``, or one flat list for a single row); instance descriptions are
        text. Without instances (None, or empty lists), without an adapter, or with
        ``control_ratio=0``, the call is the stock one.

        ``control_ratio`` is the fraction of denoising steps during which the adapter acts (1.0:
        all of them; lower values leave the late, detail-forming steps to the base model, which
        helps stylised community checkpoints and LoRAs). ``token_groups`` leaves a group of each
        instance's tokens out (the inference-time ablation, see ``IFAdapter.instance_tokens``).
        ``unconditional_layout`` is what guidance's unconditional branch keeps of the layout:
        "boxes" (the released code's choice) or "none" (the adapter acts in the conditional
        branch only).
        """
        if not 0.0 <= control_ratio <= 1.0:
            raise ValueError(f"control_ratio must be in [0, 1], got {control_ratio}")
        layouts = (
            None if instances is None else self._layouts_for_call(prompt, prompt_embeds, instances)
        )
        with_instances = layouts is not None and any(layout.instances for layout in layouts)
        if with_instances and self.adapter is None:
            raise ValueError("instances need an adapter: pass `adapter=` or call `set_adapter`")
        stock = dict(
            prompt=prompt,
            prompt_2=prompt_2,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            denoising_end=denoising_end,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
            clip_skip=clip_skip,
            **kwargs,
        )
        if not with_instances or control_ratio == 0:
            return super().__call__(
                **stock,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            )

        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        guidance = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        conditioning = self.instance_conditioning(
            layouts,
            (height // self.vae_scale_factor, width // self.vae_scale_factor),
            num_images_per_prompt,
            guidance,
            token_groups,
            unconditional_layout,
        )
        tensor_inputs = callback_on_step_end_tensor_inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs
        adapter = self.adapter

        def step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
            if (step + 1) >= math.ceil(control_ratio * pipe.num_timesteps):
                adapter.set_conditioning(None)
            if callback_on_step_end is not None:
                return callback_on_step_end(pipe, step, timestep, callback_kwargs)
            return callback_kwargs

        with adapter.installed(self.unet), adapter.activated(conditioning):
            return super().__call__(
                **stock,
                callback_on_step_end=step_end,
                callback_on_step_end_tensor_inputs=list(tensor_inputs),
            )


def _follow(adapter: IFAdapter, unet: torch.nn.Module) -> None:
    """The adapter on the UNet's device and in its dtype: one precision for the pipeline (a
    float32 adapter beside a float16 UNet would hold twice its memory and cast its keys and
    values at every attention call)."""
    if adapter.device != unet.device or adapter.dtype != unet.dtype:
        cast(adapter, unet.device, unet.dtype)
