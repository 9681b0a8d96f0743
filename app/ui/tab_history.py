"""The History tab: every image and X/Y/Z grid in the output folder (so it survives reloads and restarts), newest
first, captioned with method, seed, LoRAs and time. Clicking one puts its settings back into the form (a grid:
its base settings, and its axes into the X/Y/Z tab)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .history import HEADERS, MAX_ITEMS
from .service import GenerationService
from .tab_compose import ComposeForm, apply_settings
from .tab_grid import NONE, GridTab
from .tab_reproduce import restore_note
from .wiring import INSTANT, PRIVATE, guarded, show_failures


@dataclass
class HistoryTab:
    refresh: gr.Button
    status: gr.Markdown
    gallery: gr.Gallery
    table: gr.Dataframe
    names: gr.State  # file names in gallery order
    chosen: gr.Textbox  # hidden: the file clicked
    settings: gr.JSON  # hidden
    axes: gr.JSON  # hidden
    tab: gr.Tab | None = None


def history_tab() -> HistoryTab:
    with gr.Tab("History", id="history") as tab:
        with gr.Row():
            refresh = gr.Button("Refresh", size="sm", elem_id="history-refresh", scale=0, min_width=90)
            status = gr.Markdown("Click an image to load its settings into the form.", elem_id="history-status")
        gallery = gr.Gallery(label="Images and X/Y/Z plots in the output folder, newest first", format="png", columns=5,
                             fit_columns=False, height=520, preview=False, allow_preview=False, object_fit="contain",
                             elem_id="history-gallery", buttons=["download"])
        with gr.Accordion("as a table", open=False):
            table = gr.Dataframe(headers=HEADERS, interactive=False, elem_id="history-table", wrap=True)
        names = gr.State([])
        chosen = gr.Textbox(visible=False, label="file")
        settings = gr.JSON(None, visible=False, label="settings")
        axes = gr.JSON(None, visible=False, label="axes")
    return HistoryTab(refresh, status, gallery, table, names, chosen, settings, axes, tab)


def history_action(service: GenerationService):
    @guarded("history")
    def history(limit=MAX_ITEMS):
        """The output folder's images and grids, newest first: (gallery [(PNG, caption)], table, status)."""
        try:
            limit = max(1, min(int(limit or MAX_ITEMS), 5000))
        except (TypeError, ValueError):
            limit = MAX_ITEMS
        items = service.history.items(limit)
        gallery = [(str(i.path), i.caption) for i in items]
        note = f"{len(items)} item(s) in the output folder" + (" (the newest)" if len(items) >= limit else "")
        return gallery, [i.row() for i in items], note, [i.path.name for i in items]

    return history


def settings_action(service: GenerationService, methods: list[str]):
    @guarded("load from history")
    def history_settings(file):
        """The settings of an image (or grid) of the History by file name: (settings, axes, note); `axes` is None
        for an image, [x, y, z] ("KIND=VALUES" or None) for an X/Y/Z grid."""
        r, axes = service.from_output(file)
        settings = dict(r.settings)
        if settings.get("method") not in methods:
            settings.pop("method", None)
            settings.pop("method_params", None)
        return settings, axes, restore_note(str(file), r).replace("restored the settings of", "loaded the settings of")

    return history_settings


def apply_axes(axes, grid: GridTab):
    """The X/Y/Z tab's axis dropdowns and values for a grid's axes."""
    if not axes:
        return [gr.skip()] * 6
    out = []
    for k, text in enumerate((list(axes) + [None, None, None])[:3]):
        if not text:
            out += [NONE if k else gr.skip(), "" if k else gr.skip()]
            continue
        head, _, values = text.partition("=")
        kind = {"cfg": "CFG"}.get(head, head)
        out += [kind, values]
    kinds = [v for pair in zip(out[0::2], out[1::2]) for v in pair]
    return kinds


def wire_history(tab: HistoryTab, form: ComposeForm, grid: GridTab, service: GenerationService, after: list) -> None:
    """Refresh (`/history`) on load, when the tab is opened, on the button and after the events in `after`; a click
    loads the item's settings (`/history_settings`)."""
    outputs = [tab.gallery, tab.table, tab.status, tab.names]
    fn = history_action(service)
    ev = tab.refresh.click(fn, None, outputs, api_name="history", show_progress_on=[tab.status])
    show_failures(ev, tab.status, "history")
    for event in after:
        event.then(fn, None, outputs, show_progress="hidden", **PRIVATE)
    if tab.tab is not None:  # read the folder when the tab is opened (not after every image: it is not in view)
        tab.tab.select(fn, None, outputs, show_progress="hidden", **PRIVATE)

    def pick(names, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        return names[index] if names and 0 <= index < len(names) else gr.skip()

    picked = tab.gallery.select(pick, tab.names, tab.chosen, **INSTANT)
    loaded = picked.success(settings_action(service, form.methods), tab.chosen, [tab.settings, tab.axes, tab.status],
                            api_name="history_settings", show_progress_on=[tab.status])
    show_failures(loaded, tab.status, "load from history")
    max_rows = len(form.rows)
    filled = loaded.success(lambda s: apply_settings(form, s, max_rows), tab.settings, form.settings_outputs(), **INSTANT)
    filled.success(lambda a: apply_axes(a, grid), tab.axes,
                   [c for pair in zip(grid.kinds, grid.values) for c in pair], **INSTANT)
