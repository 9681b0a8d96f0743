"""The benchmark runner behind `loraloom bench run|score|report` (docs/benchmarks.md).

- `evaluation.bench.manifest`  — the manifest format (`loraloom-benchmark/1`): reader, validator, missing-file check
- `evaluation.bench.composlora` — builds the shipped ComposLoRA manifest from the reference metadata
- `evaluation.bench.plan`      — method variants, per-image seeds, the ordered work list and its sharding
- `evaluation.bench.store`     — the SQLite (WAL) store: items, runs, scores, pairwise judgements
- `evaluation.bench.runner`    — generation: resumable, sharded under `accelerate launch`, failures recorded
- `evaluation.bench.scoring`   — CLIPScore, the toy-world checker and an MLLM judge into the same store
- `evaluation.bench.stats`     — means, confidence intervals, paired win/tie/lose
- `evaluation.bench.svg`       — small SVG charts (no plotting library)
- `evaluation.bench.report`    — the self-contained HTML report and the Markdown summary
"""
