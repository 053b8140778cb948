"""The studio's page (Gradio): a canvas of labelled boxes, the sampling settings, and the
results: the adapter's images, the base's on the same seeds, the layout over both, and each
instance's verdict.

Boxes are drawn with ``gradio_image_annotation`` (draw, move, resize, a description per box,
over a blank canvas or an uploaded picture). Every handler turns bad input into a note on the
page (or an error message for a file it cannot read at all) and leaves the canvas as it was.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from evaluation.studio.engine import Result, Studio
from evaluation.studio.layouts import (
    canvas_size,
    from_canvas,
    layout_json,
    read_layouts,
    to_canvas,
)
from ifadapter.layout import Layout
from ifadapter.sampling import Sampling
from ifadapter.visualize import draw_layout, enlarged

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr
from gradio_image_annotation import image_annotator

CANVAS_COLOUR = (246, 246, 242)
# The verdict table: these, the judging's own columns (the toy world's attributes, or one per
# VLM judge), then the verdict.
LEADING_COLUMNS = ["image", "model", "#", "instance", "IoU"]
MARKS = {True: "✓", False: "✗", None: "–"}


def refusals(outputs: int) -> Callable:
    """A handler whose bad input (``ValueError``, or ``TypeError`` from an emptied number
    field) leaves every output as it was and says why in the notes, its last output: Gradio's
    own error state would mark every output of the event, the canvas too, as failed."""

    def wrap(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except (ValueError, TypeError) as error:
                gr.Warning(str(error))
                return (*[gr.skip()] * (outputs - 1), f"**Not done:** {error}")

        return run

    return wrap


def blank_canvas(width: int, height: int) -> Image.Image:
    return Image.new("RGB", canvas_size(width, height), CANVAS_COLOUR)


def notes_markdown(notes: list[str]) -> str:
    return "\n".join(f"- {note}" for note in notes)


def verdict_rows(result: Result, columns: tuple[str, ...]) -> list[list]:
    rows = []
    for model, verdicts in (("IFAdapter", result.adapter_verdicts), ("base", result.base_verdicts)):
        for seed, per_image in zip(result.seeds, verdicts, strict=True):
            for v in per_image:
                seen = v.attributes or {}
                rows.append(
                    [
                        f"seed {seed}",
                        model,
                        v.number,
                        v.caption,
                        f"{v.iou:.2f}" if v.judged else "–",
                        *(MARKS[seen.get(name)] for name in columns),
                        ("✓ " if v.right else "✗ " if v.judged else "") + v.summary,
                    ]
                )
    return rows


def gallery(images: list[Image.Image], layout: Layout, seeds: list[int], verdicts) -> list:
    """Each image (enlarged) and the layout drawn over it, captioned with its seed and score."""
    items = []
    for image, seed, per_image in zip(images, seeds, verdicts, strict=True):
        judged = [v for v in per_image if v.judged]
        score = f" · {sum(v.right for v in judged)}/{len(judged)} right" if judged else ""
        items.append((enlarged(image), f"seed {seed}{score}"))
        items.append((draw_layout(image, layout), f"seed {seed} · layout"))
    return items


def write_outputs(result: Result) -> list[str]:
    """The raw images, named as ``ifadapter generate`` names them, and the layout file."""
    folder = Path(tempfile.mkdtemp(prefix="ifadapter-studio-"))
    paths = []
    for prefix, images in (("", result.adapter_images), ("base_", result.base_images)):
        for j, image in enumerate(images):
            image.save(folder / f"{prefix}00000_{j}.png")
            paths.append(str(folder / f"{prefix}00000_{j}.png"))
    (folder / "layout.json").write_text(layout_json(result.layout))
    return [*paths, str(folder / "layout.json")]


def build(studio: Studio) -> gr.Blocks:
    width0, height0 = studio.default_size
    lora = f" · LoRA `{studio.lora}`" if studio.lora else ""
    title = f"base `{studio.base}` · adapter `{studio.adapter}`{lora} · {studio.pipe.device}"
    with gr.Blocks(title="IFAdapter layout studio", analytics_enabled=False) as page:
        gr.Markdown(f"## IFAdapter layout studio\n{title}")
        loaded = gr.State(None)  # the layout last put on the canvas (exact coordinates)
        file_layouts = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                canvas = image_annotator(
                    {"image": blank_canvas(width0, height0), "boxes": []},
                    label="Layout: pick the box tool, drag a box, type its description",
                    image_type="pil",
                    sources=["upload"],
                    box_min_size=4,
                    show_remove_button=True,
                    elem_id="canvas",
                )
            with gr.Column(scale=2):
                caption = gr.Textbox(label="Global caption", elem_id="caption")
                with gr.Row():
                    width = gr.Number(width0, label="width", precision=0, elem_id="width")
                    height = gr.Number(height0, label="height", precision=0, elem_id="height")
                    new = gr.Button("Blank canvas of this size", elem_id="blank")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    steps = gr.Number(20, label="steps", precision=0, elem_id="steps")
                    count = gr.Number(1, label="images", precision=0, elem_id="count")
                with gr.Row():
                    guidance = gr.Number(5.0, label="guidance", elem_id="guidance")
                    control = gr.Slider(0, 1, 1.0, step=0.05, label="control_ratio")
                unconditional = gr.Radio(
                    ["none", "boxes"],
                    value="none",
                    label="unconditional branch keeps (none: the toy adapter's best)",
                )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                notes = gr.Markdown(elem_id="notes")
                with gr.Accordion("Layout file", open=True):
                    upload = gr.UploadButton(
                        "Load JSON / JSONL (or the authors' dataset/*.json)",
                        file_types=[".json", ".jsonl"],
                        elem_id="load",
                    )
                    with gr.Row():
                        released = gr.Number(768, label="released files' canvas (px)", precision=0)
                        choice = gr.Dropdown([], label="layout in the file", elem_id="choice")
                    save = gr.Button("Save layout", elem_id="save")
                    saved = gr.File(label="layout.json", elem_id="saved")
        with gr.Row():
            adapter_view = gr.Gallery(
                label="IFAdapter", columns=2, format="png", elem_id="adapter-images"
            )
            base_view = gr.Gallery(
                label="Base model alone, same seeds",
                columns=2,
                format="png",
                elem_id="base-images",
            )
        verdicts = gr.Dataframe(
            headers=[*LEADING_COLUMNS, *studio.judging.columns, "verdict"],
            label=f"Verdicts ({studio.judging.name})",
            elem_id="verdicts",
        )
        files = gr.File(label="Images and layout", file_count="multiple", elem_id="files")

        def current(text: str, value: dict | None, exact: Layout | None):
            if not value or value.get("image") is None:
                raise ValueError("the canvas holds no picture: make a blank canvas or upload one")
            return from_canvas(text or "", value.get("boxes") or [], value["image"].size, exact)

        def show(layout: Layout, picture: Image.Image) -> dict:
            return {"image": picture, "boxes": to_canvas(layout, picture.size)}

        @refusals(3)
        def on_blank(w, h, text, value, exact):
            studio.check_size(int(w), int(h))
            checked = current(text, value, exact)
            picture = blank_canvas(int(w), int(h))
            return show(checked.layout, picture), checked.layout, notes_markdown(checked.notes)

        @refusals(6)
        def on_upload(file, canvas_px, value):
            if file is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            path = Path(file)
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                raise ValueError(f"{path.name} is not a text file") from None
            found = read_layouts(text, path.name, int(canvas_px or 768))
            picture = value["image"] if value and value.get("image") is not None else None
            picture = picture or blank_canvas(width0, height0)
            first = found.layouts[0]
            names = [f"{i + 1}: {layout.caption[:60]}" for i, layout in enumerate(found.layouts)]
            summary = [f"loaded {len(found.layouts)} layout(s) from {path.name}", *found.notes]
            return (
                show(first, picture),
                first.caption,
                first,
                found.layouts,
                gr.update(choices=names, value=names[0]),
                notes_markdown(summary),
            )

        def on_choice(name, layouts, value):
            if not name or not layouts:
                return gr.skip(), gr.skip(), gr.skip()
            layout = layouts[int(name.split(":")[0]) - 1]
            return show(layout, value["image"]), layout.caption, layout

        @refusals(2)
        def on_save(text, value, exact):
            checked = current(text, value, exact)
            folder = Path(tempfile.mkdtemp(prefix="ifadapter-layout-"))
            (folder / "layout.json").write_text(layout_json(checked.layout))
            return str(folder / "layout.json"), notes_markdown(checked.notes)

        # Gradio recognises the progress tracker by this default.
        @refusals(5)
        def on_generate(
            text,
            value,
            exact,
            s,
            n_steps,
            g,
            ratio,
            uncond,
            n,
            w,
            h,
            progress=gr.Progress(),  # noqa: B008
        ):
            checked = current(text, value, exact)
            sampling = Sampling(
                steps=int(n_steps),
                guidance=float(g),
                control_ratio=float(ratio),
                unconditional_layout=uncond,
                seed=int(s),
                num_images=int(n),
                width=int(w),
                height=int(h),
            )
            report = lambda share, what: progress(share, desc=what)  # noqa: E731
            result = studio.run(checked.layout, sampling, report)
            done = f"generated in {result.seconds:.1f} s ({len(checked.layout.instances)} boxes)"
            return (
                gallery(
                    result.adapter_images, result.layout, result.seeds, result.adapter_verdicts
                ),
                gallery(result.base_images, result.layout, result.seeds, result.base_verdicts),
                verdict_rows(result, studio.judging.columns),
                write_outputs(result),
                notes_markdown([done, *checked.notes]),
            )

        new.click(on_blank, [width, height, caption, canvas, loaded], [canvas, loaded, notes])
        upload.upload(
            on_upload,
            [upload, released, canvas],
            [canvas, caption, loaded, file_layouts, choice, notes],
        )
        choice.input(on_choice, [choice, file_layouts, canvas], [canvas, caption, loaded])
        save.click(on_save, [caption, canvas, loaded], [saved, notes])
        settings = [seed, steps, guidance, control, unconditional, count, width, height]
        run.click(
            on_generate,
            [caption, canvas, loaded, *settings],
            [adapter_view, base_view, verdicts, files, notes],
            concurrency_limit=1,  # one generation at a time; later requests wait in the queue
        )
    return page


def serve(
    base: str,
    adapter: Path,
    port: int = 7860,
    device: str | None = None,
    judges: str | Path | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
) -> None:
    """Loads the models and serves the page on localhost until interrupted."""
    studio = Studio.load(base, adapter, device, judges=judges, lora=lora, lora_scale=lora_scale)
    page = build(studio)
    page.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, show_error=True, inbrowser=False
    )
