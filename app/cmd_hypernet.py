"""`loraloom hypernet …`: train LoRA.rar's merge hypernetwork, merge a LoRA pair with it, show a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _names_or_count(value: str):
    return int(value) if value.isdigit() else [v.strip() for v in value.split(",") if v.strip()]


def register(sub) -> None:
    from loraloom.evaluation.toyworld.hypernet import TOY_STYLES, TOY_SUBJECTS
    from loraloom.pipelines.hypernet_training import HypernetTrainConfig

    d = HypernetTrainConfig()
    p = sub.add_parser("hypernet", help="train / use the LoRA.rar merge hypernetwork",
                       description="LoRA.rar's hypernetwork predicts ZipLoRA-style per-column merge coefficients of a "
                                   "subject and a style LoRA in one forward pass. See docs/methods/klora_ziplora_hypernet.md.")
    hn = p.add_subparsers(dest="hypernet_command", metavar="ACTION")

    t = hn.add_parser("train", help="train a hypernetwork on folders of subject and style LoRAs (resumable)",
                      description="Random (subject, style) pairs from the training split, one per epoch; ZipLoRA's loss "
                                  "(each LoRA's own prediction on its own prompt at noised reference latents, plus the "
                                  "coefficient-similarity penalty). Reference images are generated with each LoRA alone. "
                                  "Checkpoints go to --work every --checkpoint-every epochs; run the same command again "
                                  "to resume.")
    t.add_argument("--model", required=True, help="base model the LoRAs were trained on (diffusers folder, hub id, tiny:sd1)")
    t.add_argument("--subjects", required=True, help="folder of subject LoRAs (.safetensors, with sidecars)")
    t.add_argument("--styles", required=True, help="folder of style LoRAs")
    t.add_argument("--out", required=True, help="the trained hypernetwork (.safetensors)")
    t.add_argument("--work", help="checkpoints and cached reference latents (default: <out>.work/)")
    t.add_argument("--epochs", type=int, default=d.epochs, help=f"random pairs, one per epoch (default {d.epochs}, as LoRA.rar)")
    t.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate, constant (default {d.lr})")
    t.add_argument("--lam", type=float, default=d.lam, help=f"weight of the |cos(m_c, m_s)| penalty (default {d.lam})")
    t.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden width (default {d.hidden})")
    t.add_argument("--input-scale", type=float, default=d.input_scale, help="column scale before the first layer (default 0: 1 / RMS of the training deltas)")
    t.add_argument("--images-per-lora", type=int, default=d.images_per_lora, help=f"reference images per LoRA (default {d.images_per_lora})")
    t.add_argument("--reference-steps", type=int, default=d.reference_steps, help=f"steps per reference image (default {d.reference_steps})")
    t.add_argument("--guidance-scale", type=float, default=d.guidance_scale, help=f"CFG of the reference images (default {d.guidance_scale})")
    t.add_argument("--negative-prompt", default=d.negative_prompt)
    t.add_argument("--height", type=int)
    t.add_argument("--width", type=int)
    t.add_argument("--subject-prompt", default="", help="template of a subject LoRA's own prompt ({trigger} = its trigger "
                                                        "words); default: its sidecar 'prompt', else its trigger words")
    t.add_argument("--style-prompt", default="", help="the same for style LoRAs")
    t.add_argument("--images", default="", help="folder with a sub-folder per LoRA (named as its file, without .safetensors) "
                                                "of its training images; LoRAs without one get generated references")
    t.add_argument("--val-subjects", type=_names_or_count, default=d.val_subjects,
                   help=f"held-out subject LoRAs: a count drawn with the seed, or comma-separated names (default {d.val_subjects})")
    t.add_argument("--val-styles", type=_names_or_count, default=d.val_styles, help=f"the same for styles (default {d.val_styles})")
    t.add_argument("--val-every", type=int, default=d.val_every, help=f"validation every N epochs (default {d.val_every})")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"checkpoint every N epochs (default {d.checkpoint_every})")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", help="float32 (default) or bfloat16/float16 for the base model")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_train)

    m = hn.add_parser("merge", help="merge a subject and a style LoRA with a hypernetwork into one LoRA file",
                      description="One hypernetwork forward per layer; the result is an ordinary diffusers-layout LoRA "
                                  "(use it with method merge, lora_scale 1, or in diffusers' load_lora_weights).")
    m.add_argument("subject", help="subject LoRA file")
    m.add_argument("style", help="style LoRA file")
    m.add_argument("--out", "-o", required=True, help="merged LoRA (.safetensors)")
    m.add_argument("--checkpoint", help="hypernetwork (default: the shipped toy-world one)")
    m.add_argument("--kv-merge", choices=["sum", "average"], default="sum")
    m.add_argument("--subject-weight", type=float, default=1.0)
    m.add_argument("--style-weight", type=float, default=1.0)
    m.set_defaults(func=run_merge)

    i = hn.add_parser("info", help="show a hypernetwork checkpoint's configuration and training record")
    i.add_argument("checkpoint")
    i.set_defaults(func=run_info)

    tl = hn.add_parser("toyworld-loras", help="train extra toy-world subject and style LoRAs for the hypernetwork",
                       description="Re-trains toy-world concepts with the toy world's own LoRA recipe under other seeds "
                                   "(the toy world has 7 subject-like and 4 style-like concepts; the shipped LoRAs are "
                                   "kept for evaluation). Writes <out>/subjects and <out>/styles with sidecars that "
                                   "carry each LoRA's own prompt. Resumable.")
    tl.add_argument("--out", required=True, help="folder for subjects/ and styles/")
    tl.add_argument("--work", help="checkpoints (default: <out>.work/)")
    tl.add_argument("--model", help="toy-world model folder (default: assets/toyworld/model)")
    tl.add_argument("--subjects", nargs="*", default=list(TOY_SUBJECTS), metavar="ID:SEED",
                    help=f"subject LoRAs as concept-id:seed (default: {' '.join(TOY_SUBJECTS)})")
    tl.add_argument("--styles", nargs="*", default=list(TOY_STYLES), metavar="ID:SEED",
                    help=f"style LoRAs as concept-id:seed (default: {' '.join(TOY_STYLES)})")
    tl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of the toy world's recipe (evaluation/toyworld/recipe.py), e.g. lora_steps=200")
    tl.add_argument("--no-progress", action="store_true")
    tl.set_defaults(func=run_toyworld_loras)

    te = hn.add_parser("toyworld-eval", help="the toy-world table: subject x style pairs, checker rate per method",
                       description="Every (subject LoRA, style LoRA) pair of the shipped toy world x seeds, generated "
                                   "with each method at its defaults; the checker says whether the subject and the style "
                                   "are both present. Resumable (existing images are re-scored, not regenerated).")
    te.add_argument("--out", default="outputs/hypernet-toyworld-eval", help="images, scores.json and table.md")
    te.add_argument("--methods", default="merge,klora,ziplora,hypernet,composite,switch")
    te.add_argument("--subjects", default="character_1,character_2,character_3")
    te.add_argument("--styles", default="style_1,style_2,background_1,background_2")
    te.add_argument("--seeds", type=int, default=4)
    te.add_argument("--checkpoint", help="hypernetwork (default: the shipped one)")
    te.add_argument("--steps", type=int, help="sampling steps (default: the toy world's own, from its benchmark.yaml)")
    te.add_argument("--guidance-scale", type=float,
                    help="CFG scale (default: the toy world's own, from its benchmark.yaml; the tables in "
                         "docs/methods/klora_ziplora_hypernet.md were made with 4)")
    te.add_argument("--no-progress", action="store_true")
    te.set_defaults(func=run_toyworld_eval)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_train(args: argparse.Namespace) -> int:
    import torch

    from loraloom.pipelines import ComposedPipeline
    from loraloom.pipelines.hypernet_training import HypernetTrainConfig, HypernetTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = HypernetTrainConfig(
        epochs=args.epochs, lr=args.lr, lam=args.lam, hidden=args.hidden, input_scale=args.input_scale,
        images_per_lora=args.images_per_lora, reference_steps=args.reference_steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, subject_prompt=args.subject_prompt,
        style_prompt=args.style_prompt, images=args.images, val_subjects=args.val_subjects, val_styles=args.val_styles,
        val_every=args.val_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
    )
    cp = ComposedPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype or "float32")
    work = Path(args.work or f"{args.out}.work")
    trainer = HypernetTrainer(cp, args.subjects, args.styles, work, cfg, progress=not args.no_progress)
    trainer.train(args.out)
    s = trainer.summary(trainer.state)
    val = s["validation"][-1]["loss"] if s["validation"] else float("nan")
    print(f"hypernetwork written to {args.out}: {s['epochs']} epochs, {s['steps']} steps, {s['train_seconds']:.0f} s; "
          f"train loss (last 20 steps) {s['train_loss_last20']:.4g}, validation loss {val:.4g} "
          f"({len(s['val_subjects'])} x {len(s['val_styles'])} held-out pairs)")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from loraloom.composition import load_lora
    from loraloom.composition.hypernetwork import MergeHypernetwork
    from loraloom.composition.merging import save_lora_file
    from loraloom.composition.methods.hypernet import DEFAULT_CHECKPOINT, merge_with_hypernet

    net = MergeHypernetwork.load(args.checkpoint or DEFAULT_CHECKPOINT)
    subject, style = load_lora(args.subject), load_lora(args.style)
    merged = merge_with_hypernet(net, subject, style, args.subject_weight, args.style_weight, args.kv_merge,
                                 name=Path(args.out).stem)
    from loraloom.composition.files import WritePolicy

    out = Path(args.out).expanduser().resolve()  # --out, as typed on this command line
    save_lora_file(merged, out, WritePolicy.at(out.parent).protecting(args.subject, args.style))
    print(f"merged LoRA written to {args.out} ({merged.info.num_modules} modules, ranks {merged.info.ranks})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from loraloom.composition.hypernetwork import read_info

    print(json.dumps(read_info(args.checkpoint), indent=2))
    return 0


# --- toy world (evaluation/toyworld/hypernet.py) ----------------------------------------------------------
def run_toyworld_loras(args: argparse.Namespace) -> int:
    from loraloom.evaluation.toyworld import MODEL
    from loraloom.evaluation.toyworld.hypernet import train_variant_loras

    from .cmd_toyworld import recipe_with_settings

    recipe = recipe_with_settings((item.partition("=")[::2] for item in args.set), "loraloom hypernet toyworld-loras")
    out = Path(args.out)
    written = train_variant_loras(out, Path(args.work or f"{out}.work"), Path(args.model or MODEL), args.subjects,
                                  args.styles, recipe, progress=not args.no_progress)
    for target, spec, seed in written:
        print(f"{target}: {spec.name} ({spec.category}), seed {seed}")
    return 0


def run_toyworld_eval(args: argparse.Namespace) -> int:
    from loraloom.evaluation.toyworld.hypernet import evaluate_pairs

    table = evaluate_pairs(Path(args.out), [m for m in args.methods.split(",") if m], args.subjects.split(","),
                           args.styles.split(","), args.seeds, checkpoint=args.checkpoint, steps=args.steps,
                           guidance_scale=args.guidance_scale, progress=not args.no_progress)
    print(table)
    return 0
