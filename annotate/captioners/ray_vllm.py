"""Captioning with vLLM inside Ray Data (``ray.data.llm``): cluster batch jobs on GPUs.

No server to run: ``build_processor`` with a ``vLLMEngineProcessorConfig`` appends Ray Data
operators (multimodal preparation, chat template, tokenisation, the vLLM engines on GPUs,
detokenisation) to the engine's dataset, and Ray Data streams records through them like through
any other stage. Ray's processor maps rows one to one, so each record is one request: the whole
image and the crops of its first ``instances_per_request`` instances, asking for the global
caption and every instance caption in one JSON reply (the joint prompt of ``PromptSet``).
Instances past that limit keep an empty caption with an ``over_limit`` fault.

The requests, schemas and parsers are the ones the other captioners use; a row vLLM fails on
comes back with ``__inference_error__`` set (``should_continue_on_error``) and every caption of
that record gets an ``inference_error`` fault. A record rejected by an earlier stage still has
to pass the processor: it goes as a one-token text request whose answer is ignored.

Needs vLLM on the GPU workers (the ``vllm`` extra; it pins its own torch, so it lives in the
workers' environment, not in this project's CPU environment).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import pyarrow as pa
from pydantic import BaseModel, Field, PositiveInt

from annotate.backends import DatasetCaptioner
from annotate.captioners.requests import (
    STAGE,
    CaptionSettings,
    apply_results,
    build_request,
    parse_reply,
    record_crops,
)
from annotate.config import StageConfig
from annotate.engine.records import PIXEL_COLUMNS, Captions, Fault, Record
from annotate.vlm.client import ChatReply, encode_image

if TYPE_CHECKING:
    import ray.data

ERROR_COLUMN = "__inference_error__"
SKIPPED = [{"role": "user", "content": "."}]


class RayVLLMSettings(CaptionSettings):
    model: str  # hub id or a path every GPU worker can read (vLLM loads it there)
    instances_per_request: PositiveInt = 16  # crops per image request (the rest: over_limit)
    max_model_len: PositiveInt = 8192
    engine_kwargs: dict = Field(default_factory=dict)  # more vLLM engine arguments
    accelerator_type: str | None = None  # e.g. "H100"; None: any GPU


def request_row(row: dict, settings: RayVLLMSettings, names: list[str]) -> dict:
    """The processor's preprocess: the record's columns, its messages and sampling params."""
    record = Record.from_row({name: row[name] for name in names})
    if record.rejected:
        return {"messages": SKIPPED, "sampling_params": {"temperature": 0.0, "max_tokens": 1}}
    crops = record_crops(record, settings.crop_padding)[: settings.instances_per_request]
    request = build_request(encode_image(record.rgb()), crops, settings)
    return {
        "messages": request.messages(),
        "sampling_params": {
            "temperature": 0.0,
            "max_tokens": request.max_tokens,
            "structured_outputs": {"json": request.schema},
        },
    }


def caption_record(record: Record, reply: ChatReply, settings: RayVLLMSettings) -> None:
    """Stores the joint reply's captions (and faults) on a live record."""
    count = len(record.instances)
    asked = min(count, settings.instances_per_request)
    captions = Captions("", [""] * count)
    results = parse_reply(reply, True, asked, settings)
    apply_results(captions, results, [None, *range(asked)])
    for instance in range(asked, count):
        reason = f"over_limit: one request carries {settings.instances_per_request} instances"
        captions.faults.append(Fault(STAGE, reason, instance))
    record.caption = captions.caption
    record.faults += captions.faults
    for detection, text in zip(record.instances, captions.instances, strict=True):
        detection.caption = text


def reply_columns(row: dict, names: list[str]) -> dict:
    """The processor's postprocess (rows vLLM answered): the record's columns and the reply."""
    budget = (row.get("sampling_params") or {}).get("max_tokens")
    cut = budget is not None and row.get("num_generated_tokens", 0) >= budget
    return {
        **{name: row.get(name) for name in names},
        "generated_text": row.get("generated_text") or "",
        "finish_reason": "length" if cut else "stop",
    }


def result_row(row: dict, settings: RayVLLMSettings, names: list[str]) -> dict:
    """After the processor (answered rows through ``reply_columns``; the rows vLLM failed on
    bypass it, with ``__inference_error__``): the record's columns, captions and faults filled
    in, pixels dropped."""
    record = Record.from_row({name: row.get(name) for name in names})
    if not record.rejected:
        error = row.get(ERROR_COLUMN) or ""
        if error:
            reply = ChatReply.failed(f"inference_error: {error}")
        else:
            reply = ChatReply(text=row["generated_text"], finish_reason=row["finish_reason"])
        caption_record(record, reply, settings)
    out = record.to_row()
    out.update(dict.fromkeys(PIXEL_COLUMNS))
    return {name: out.get(name) for name in names}


class RayVLLMCaptioner(DatasetCaptioner):
    Settings: ClassVar[type[BaseModel]] = RayVLLMSettings
    packages: ClassVar[tuple[str, ...]] = ("ray",)

    @classmethod
    def transform(
        cls, dataset: ray.data.Dataset, stage: StageConfig, schema: pa.Schema
    ) -> ray.data.Dataset:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        settings: RayVLLMSettings = stage.settings  # type: ignore[assignment]
        names = schema.names
        engine_kwargs = {
            "max_model_len": settings.max_model_len,
            "limit_mm_per_prompt": {"image": 1 + settings.instances_per_request},
            **settings.engine_kwargs,
        }
        config = vLLMEngineProcessorConfig(
            model_source=settings.model,
            engine_kwargs=engine_kwargs,
            batch_size=stage.batch_size,
            concurrency=stage.workers,
            accelerator_type=settings.accelerator_type,
            prepare_multimodal_stage={"enabled": True},
            should_continue_on_error=True,
        )
        processor = build_processor(
            config,
            preprocess=lambda row: request_row(row, settings, names),
            postprocess=lambda row: reply_columns(row, names),
        )
        return restore(processor(dataset), settings, schema)


def restore(
    rows: ray.data.Dataset, settings: RayVLLMSettings, schema: pa.Schema
) -> ray.data.Dataset:
    """The processor's output rows as the engine's work rows again (captions and faults in)."""
    names = schema.names
    records = rows.map(lambda row: result_row(row, settings, names))
    return records.map_batches(
        lambda table: table.select(names).cast(schema), batch_format="pyarrow"
    )
