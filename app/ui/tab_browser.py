"""The LoRA browser (Workbench tab "LoRAs"): a card per LoRA (thumbnail, name, category, base family, rank,
trigger words), search and a category filter; a click puts the LoRA into the next free LoRA row. "Make preview"
renders the LoRA alone on a fixed prompt and seed and saves it as the LoRA's preview image; "Use the last image"
makes the newest image the preview. Previews are written beside the LoRA through its folder's write policy."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import gradio as gr

from loraloom.composition.errors import SpecError
from loraloom.composition.metadata import CATEGORIES

from .service import GenerationService, LibraryItem
from .streaming import stream_generation
from .tab_compose import START_ROWS, ComposeForm
from .tab_library import preview_image
from .wiring import ON_MODEL_QUEUE, PRIVATE, code_span, guarded, show_failures

ALL = "all categories"
CATEGORY_COLOURS = {"character": (214, 96, 77), "clothing": (230, 160, 60), "style": (120, 90, 200),
                    "background": (70, 150, 110), "object": (70, 130, 200), None: (140, 140, 140)}


@dataclass
class BrowserTab:
    search: gr.Textbox
    category: gr.Dropdown
    gallery: gr.Gallery
    names: gr.State  # card order
    status: gr.Markdown
    selected: gr.Textbox
    details: gr.Markdown
    make_preview: gr.Button
    use_last: gr.Button


def card_caption(item: LibraryItem) -> str:
    info = item.info
    if info is None:
        return f"{item.name} · not usable: {item.error or '?'}"
    triggers = ", ".join(info.triggers) or "no trigger words"
    return f"{item.name} · {info.category or 'no category'} · {info.family or '?'} · rank {info.rank} · {triggers}"


@lru_cache(maxsize=512)
def placeholder(name: str, category: str | None, side: int = 128):
    """A card image for a LoRA without a preview: its category's colour and initials."""
    from PIL import Image, ImageDraw, ImageFont

    colour = CATEGORY_COLOURS.get(category, CATEGORY_COLOURS[None])
    img = Image.new("RGB", (side, side), tuple(int(c * 0.35 + 255 * 0.65) for c in colour))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=side // 3)
    except (TypeError, OSError):
        font = ImageFont.load_default()
    text = "".join(part[:1] for part in name.replace("-", "_").split("_")[:2]).upper() or "?"
    w = d.textlength(text, font=font)
    d.text(((side - w) / 2, side / 2 - side / 5), text, fill=colour, font=font)
    return img


def cards(items: list[LibraryItem], search: str = "", category: str = ALL) -> tuple[list, list[str]]:
    """(gallery values, names in order) of the LoRAs matching `search` (in the name, category or trigger words)
    and `category`."""
    words = [w for w in (search or "").lower().split() if w]
    out, names = [], []
    for item in items:
        info = item.info
        if category and category != ALL and (info is None or info.category != category):
            continue
        hay = " ".join([item.name, info.category or "", " ".join(info.triggers)] if info else [item.name]).lower()
        if not all(w in hay for w in words):
            continue
        image = preview_image(item, 160) or placeholder(item.name, info.category if info else None)
        out.append((image, card_caption(item)))
        names.append(item.name)
    return out, names


def browser_tab(items: list[LibraryItem]) -> BrowserTab:
    values, names = cards(items)
    with gr.Tab("LoRAs", id="browser"):
        with gr.Row():
            search = gr.Textbox("", label="search", placeholder="name, category or trigger word", elem_id="lora-search",
                                scale=3, min_width=140)
            category = gr.Dropdown([ALL, *CATEGORIES], value=ALL, label="category", elem_id="lora-category", scale=1,
                                   min_width=120)
        status = gr.Markdown("Click a LoRA to put it into the next free LoRA row.", elem_id="browser-status")
        gallery = gr.Gallery(values, label="LoRAs", columns=4, fit_columns=False, height=560, preview=False,
                             allow_preview=False, object_fit="contain", elem_id="lora-cards", format="png")
        selected = gr.Textbox(visible=False, label="LoRA")
        details = gr.Markdown("", elem_id="lora-details")
        with gr.Row():
            make_preview = gr.Button("Make preview (the LoRA alone, seed 0)", size="sm", elem_id="make-preview")
            use_last = gr.Button("Use the last image as its preview", size="sm", elem_id="use-as-preview")
        card_names = gr.State(names)
    return BrowserTab(search, category, gallery, card_names, status, selected, details, make_preview, use_last)


def details_of(item: LibraryItem) -> str:
    info = item.info
    if info is None:
        return f"**{item.name}** — not usable: {code_span(item.error or '?')}"
    prev = f"preview `{item.preview.name}`" if item.preview else "no preview yet"
    return (f"**{item.name}** · {info.category or 'no category'} · {info.family or '?'} · rank {info.rank} · "
            f"triggers: {code_span(', '.join(info.triggers) or 'none')} · {prev}")


def add_to_rows(name: str, shown: int, current: list[str], max_rows: int) -> tuple[int, int]:
    """(row index for `name`, rows shown after): the first shown row without a LoRA, else the next hidden row.
    `SpecError` when `name` is in a row already or every row is taken."""
    if name in current:
        raise SpecError(f"{name} is in LoRA row {current.index(name) + 1} already")
    shown = max(int(shown or START_ROWS), 1)
    for k in range(shown):
        if not current[k]:
            return k, shown
    if shown < max_rows:
        return shown, shown + 1
    raise SpecError(f"all {max_rows} LoRA rows are taken. Fix: remove one (✕) first")


def wire_browser(tab: BrowserTab, form: ComposeForm, service: GenerationService, last_image) -> list:
    """Search and filter (private), click to add, make or set a preview (`/make_preview`, `/set_preview`). Returns
    the events after which the library changed (for refreshing the other views)."""
    max_rows = len(form.rows)

    def refresh(search, category):
        values, names = cards(service.library(), search, category)
        return values, names

    for trigger in (tab.search.input, tab.category.change):
        trigger(refresh, [tab.search, tab.category], [tab.gallery, tab.names], trigger_mode="always_last",
                show_progress="hidden", **PRIVATE)

    @guarded("add LoRA to the form")
    def pick(evt: gr.SelectData, names, shown, *current):
        index = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        name = names[index]
        item = service.lora(name)
        k, shown = add_to_rows(name, shown, list(current), max_rows)
        rows = [gr.skip()] * max_rows
        rows[k] = name
        return [name, details_of(item), f"added **{name}** to LoRA row {k + 1}", shown,
                *[gr.Group(visible=j < shown) for j in range(max_rows)], gr.Button(visible=shown < max_rows), *rows]

    ev = tab.gallery.select(pick, [tab.names, form.shown, *form.slot_names],
                            [tab.selected, tab.details, tab.status, form.shown, *[r.group for r in form.rows],
                             form.add_row, *form.slot_names], show_progress="hidden", **PRIVATE)
    show_failures(ev, tab.status, "add LoRA to the form")

    @guarded("make preview")
    def make_preview(name, model, search, category):
        """Render LoRA `name` alone (merge, weight 1, seed 0, the default prompt and sampler settings) and save it as
        its preview image beside the LoRA. Returns (cards, names, details, status)."""
        if not name:
            raise SpecError("no LoRA chosen. Fix: click a LoRA card first")
        spec = service.preview_spec(name, model or None)
        result = None
        for ev in stream_generation(service, spec, preview_every=0):
            result = ev
        written = service.set_preview(name, result.path)
        values, names = cards(service.library(), search, category)
        return values, names, details_of(service.lora(name)), f"preview of **{name}** saved as `{written.name}`"

    outs = [tab.gallery, tab.names, tab.details, tab.status]
    ev1 = tab.make_preview.click(make_preview, [tab.selected, form.model, tab.search, tab.category], outs,
                                 api_name="make_preview", show_progress_on=[tab.status], **ON_MODEL_QUEUE)
    show_failures(ev1, tab.status, "make preview")

    @guarded("set preview")
    def set_preview(name, image, search, category):
        """Make an image of the output folder (`image`: its file name or path) the preview of LoRA `name`."""
        if not name:
            raise SpecError("no LoRA chosen. Fix: click a LoRA card first")
        if not image:
            raise SpecError("no image yet. Fix: generate one first")
        path = service.config.output_dir / str(image) if "/" not in str(image) else image
        written = service.set_preview(name, path)
        values, names = cards(service.library(), search, category)
        return values, names, details_of(service.lora(name)), f"preview of **{name}** is now `{written.name}`"

    ev2 = tab.use_last.click(set_preview, [tab.selected, last_image, tab.search, tab.category], outs,
                             api_name="set_preview", show_progress_on=[tab.status], concurrency_limit=None)
    show_failures(ev2, tab.status, "set preview")
    return [ev1, ev2]
