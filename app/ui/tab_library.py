"""The Library tab: the LoRA files in the configured folders (family, rank, triggers, previews, load errors); edit a
LoRA's category and trigger words, rescan, or add an uploaded LoRA. Each change refreshes the Compose slots' choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from loraloom.composition.metadata import CATEGORIES

from .config import UIConfig
from .service import GenerationService, LibraryItem
from .uploads import UploadRefused, discard_upload, upload_path
from .wiring import ON_MODEL_QUEUE, PRIVATE, fail, guarded, show_failures, upload_folder

LIBRARY_HEADERS = ["name", "family", "rank", "category", "triggers", "suggested triggers", "preview", "file", "error"]


@dataclass
class LibraryTab:
    refresh_btn: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    sel_name: gr.Textbox
    sel_category: gr.Dropdown
    sel_triggers: gr.Textbox
    sel_suggestions: gr.Markdown
    save_btn: gr.Button
    sel_preview: gr.Image
    gallery: gr.Gallery
    upload: gr.File


def library_rows(items: list[LibraryItem]) -> list[list[Any]]:
    """The table's rows, one per file (in LIBRARY_HEADERS order; blank where the file did not load)."""
    rows = []
    for i in items:
        info = i.info
        rows.append([
            i.name, (info.family or "?") if info else "", info.rank if info else "",
            (info.category or "") if info else "",
            ", ".join(info.triggers) if info else "", ", ".join(info.trigger_suggestions) if info else "",
            "yes" if i.preview else "", i.path.name, i.error or "",
        ])
    return rows


def preview_image(item: LibraryItem, side: int = 256):
    """The LoRA's preview image as a small RGB picture (read here, so its folder is never served as files)."""
    from PIL import Image

    if item.preview is None:
        return None
    try:
        with Image.open(item.preview) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            return im
    except OSError:
        return None


def preview_items(items: list[LibraryItem]) -> list:
    """(picture, name) for the previews gallery: the LoRAs that have a readable preview."""
    return [(img, i.name) for i in items if (img := preview_image(i)) is not None]


def library_tab(config: UIConfig, items: list[LibraryItem]) -> LibraryTab:
    with gr.Tab("Library", id="library"):
        with gr.Row():
            refresh_btn = gr.Button("Refresh", size="sm", elem_id="refresh")
            status = gr.Markdown("", elem_id="library-status")
        table = gr.Dataframe(library_rows(items), headers=LIBRARY_HEADERS, interactive=False,
                             elem_id="library-table", wrap=True)
        with gr.Row():
            with gr.Column(scale=2):
                sel_name = gr.Textbox(label="LoRA", interactive=False, elem_id="sel-name")
                sel_category = gr.Dropdown(["", *CATEGORIES], value="", label="Category", elem_id="sel-category")
                sel_triggers = gr.Textbox(label="Trigger words (comma-separated)", elem_id="sel-triggers")
                sel_suggestions = gr.Markdown("")
                save_btn = gr.Button("Save to sidecar", elem_id="save-meta")
            sel_preview = gr.Image(label="Preview", interactive=False, type="pil", scale=1, height=200)
            gallery = gr.Gallery(preview_items(items), label="Previews", columns=6, fit_columns=False,
                                 format="png", scale=3, height=200, object_fit="contain", elem_id="lib-previews")
        upload = gr.File(label="Add a LoRA (.safetensors, checked before it is copied into the library)",
                         file_types=[".safetensors"], type="filepath", visible=config.allow_lora_upload,
                         elem_id="lora-upload")
    return LibraryTab(refresh_btn, status, table, sel_name, sel_category, sel_triggers, sel_suggestions, save_btn,
                      sel_preview, gallery, upload)


def library_outputs(items: list[LibraryItem], note: str, n_slots: int) -> list:
    """Values for [table, previews, status, *Compose LoRA slots]: the slots offer the LoRAs that load."""
    names = ["", *[i.name for i in items if i.info is not None]]
    return [library_rows(items), preview_items(items), note, *[gr.Dropdown(choices=names) for _ in range(n_slots)]]


def refresh_action(service: GenerationService, config: UIConfig, n_slots: int):
    @guarded("refresh")
    def refresh():
        """Rescan the LoRA folders; returns the library table."""
        items = service.library(refresh=True)
        return library_outputs(items, f"{len(items)} file(s) in {', '.join(str(d) for d in config.lora_dirs)}",
                               n_slots)

    return refresh


def select_action(service: GenerationService):
    @guarded("select")
    def select(evt: gr.SelectData):
        row = evt.row_value or []
        item = next((i for i in service.library() if row and i.name == row[0]), None)
        if item is None or item.info is None:
            return "", "", "", (item.error if item else ""), None
        sugg = ", ".join(item.info.trigger_suggestions)
        return (item.name, item.info.category or "", ", ".join(item.info.triggers),
                f"suggested by the file: {sugg}" if sugg else "", preview_image(item))

    return select


def save_action(service: GenerationService, n_slots: int):
    @guarded("save")
    def save_metadata(name, category, triggers):
        """Save a LoRA's category and trigger words to its sidecar file; returns the library table."""
        triggers_list = [t.strip() for t in (triggers or "").split(",") if t.strip()]
        target = service.save_lora_metadata(name, category or None, triggers_list)
        return library_outputs(service.library(), f"saved `{target.name}`", n_slots)

    return save_metadata


def add_action(service: GenerationService, config: UIConfig, n_slots: int):
    @guarded("add LoRA")
    def add_lora(file):
        """Check an uploaded .safetensors LoRA and copy it into the first LoRA folder."""
        upload = upload_path(file)
        if upload is None:
            return [gr.skip()] * (3 + n_slots)  # table, previews, status, slots
        path, name = upload
        try:  # the upload's temporary file goes, whether it was refused or copied into the library
            if not config.allow_lora_upload:
                raise fail(UploadRefused("LoRA uploads are switched off on this server (--no-lora-upload)."))
            item = service.add_lora_file(path, name)
        finally:
            discard_upload(path, upload_folder())
        return library_outputs(service.library(), f"added `{item.name}` ({item.info.family}, rank {item.info.rank})",
                               n_slots)

    return add_lora


def wire_library(tab: LibraryTab, slot_names: list[gr.Dropdown], service: GenerationService, config: UIConfig) -> None:
    """Refresh (`/library`), select a row, save (`/save_metadata`) and upload (`/add_lora`, on the model queue)."""
    outputs = [tab.table, tab.gallery, tab.status, *slot_names]
    n = len(slot_names)
    local = dict(show_progress_on=[tab.status])  # progress and errors show on the status line, not on every output
    ev = tab.refresh_btn.click(refresh_action(service, config, n), None, outputs, api_name="library", **local)
    show_failures(ev, tab.status, "refresh")
    ev = tab.table.select(select_action(service), None,
                          [tab.sel_name, tab.sel_category, tab.sel_triggers, tab.sel_suggestions, tab.sel_preview],
                          show_progress="hidden", **PRIVATE)
    show_failures(ev, tab.status, "select")
    ev = tab.save_btn.click(save_action(service, n), [tab.sel_name, tab.sel_category, tab.sel_triggers], outputs,
                            api_name="save_metadata", **local)
    show_failures(ev, tab.status, "save")
    ev = tab.upload.upload(add_action(service, config, n), tab.upload, outputs, api_name="add_lora", preprocess=False,
                           **local, **ON_MODEL_QUEUE)  # the handler checks the file itself and deletes it in every case
    show_failures(ev, tab.status, "add LoRA")
