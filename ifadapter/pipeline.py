"""``IFAdapterSDXLPipeline``: the stock SDXL pipeline plus instances.

It is a thin subclass: the denoising loop, schedulers, LoRA loading (``load_lora_weights``),
``from_pretrained`` / ``from_single_file`` and everything else are diffusers' own. What it adds
happens around the stock ``__call__``: the instance descriptions are encoded and turned into
appearance tokens once, the ISM layers get the conditioning for the whole generation (the
unconditional branch of guidance keeps only the box embedding, or nothing), and a step-end
callback switches the adapter off after the ``control_ratio`` fraction of the steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Literal

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from ifadapter.adapter import TOKEN_GROUPS, IFAdapter
from ifadapter.attention_processor import InstanceConditioning
from ifadapter.layout import Instance, Layout, LayoutTensors
from ifadapter.text import encode_instances

# What the unconditional branch of classifier-free guidance keeps of the layout: "boxes" (each
# instance's box embedding, as the released code and the training's condition dropout do), or
# "none" (the adapter is off there, so guidance amplifies the layout as well as the caption).
UnconditionalLayout = Literal["boxes", "none"]


class IFAdapterSDXLPipeline(StableDiffusionXLPipeline):
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "adapter"]  # noqa: RUF012

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
        self.register_modules(adapter=adapter)
        if adapter is not None:
            adapter.install(unet)

    def set_adapter(self, adapter: IFAdapter) -> None:
        """Attaches (or replaces) the adapter on this pipeline's UNet."""
        adapter.to(self.unet.device)
        adapter.install(self.unet)
        self.register_modules(adapter=adapter)

    def layouts(
        self,
        prompt: str | Sequence[str],
        instances: Sequence[Instance | dict] | Sequence[Sequence[Instance | dict]] | None,
    ) -> list[Layout]:
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
        features = encode_instances(
            [self.tokenizer, self.tokenizer_2],
            [self.text_encoder, self.text_encoder_2],
            tensors,
            self.adapter.config.text_encoder_layers,
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

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        instances: list[Instance | dict] | list[list[Instance | dict]] | None = None,
        *,
        control_ratio: float = 1.0,
        token_groups: Collection[str] = TOKEN_GROUPS,
        unconditional_layout: UnconditionalLayout = "boxes",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **kwargs,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generates ``prompt`` with ``instances`` (a list per prompt for a batch of prompts).

        ``control_ratio`` is the fraction of denoising steps during which the adapter acts (1.0:
        all of them; lower values leave the late, detail-forming steps to the base model, which
        helps stylised community checkpoints and LoRAs). ``token_groups`` leaves a group of each
        instance's tokens out (the inference-time ablation, see ``IFAdapter.instance_tokens``).
        ``unconditional_layout`` is what guidance's unconditional branch keeps of the layout:
        "boxes" (the released code's choice) or "none" (the adapter acts in the conditional
        branch only). Other arguments are the stock SDXL pipeline's.
        """
        if prompt is None:
            raise ValueError(
                "IFAdapterSDXLPipeline needs `prompt` text (the layout's global caption)"
            )
        if not 0.0 <= control_ratio <= 1.0:
            raise ValueError(f"control_ratio must be in [0, 1], got {control_ratio}")
        if self.adapter is None:
            raise ValueError("no adapter attached: pass `adapter=` or call `set_adapter`")
        layouts = self.layouts(prompt, instances)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        guidance = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

        conditioning = None
        if control_ratio > 0 and any(layout.instances for layout in layouts):
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

        with adapter.activated(conditioning):
            return super().__call__(
                prompt=[layout.caption for layout in layouts],
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                callback_on_step_end=step_end,
                callback_on_step_end_tensor_inputs=list(tensor_inputs or ["latents"]),
                **kwargs,
            )
