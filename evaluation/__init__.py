"""Scoring what the pipelines make. A library first (the CLI, the web UI and the benchmark runner call it);
nothing heavy is imported here, import the module you need:

- `evaluation.clipscore`  — `CLIPScorer` (open_clip or transformers CLIP; 100· or 2.5·max(cos, 0); long texts flagged)
- `evaluation.similarity` — `ImageSimilarity` with `ClipImageEncoder` (CLIP-I) or `DinoEncoder` (DINO/DINOv2)
- `evaluation.judges`     — `OpenAIChatJudge` (any OpenAI-compatible API), `TransformersVLMJudge` (local VLM), `ask`
- `evaluation.protocols`  — `ComposLoRAPairwise`, `LoRARarYesNo`, `win_tie_lose`, `mars2`
- `evaluation.parsing`    — `parse_pairwise`, `parse_yes_no` (JSON, then one strict pattern, else a failure)
- `evaluation.cache`      — `JudgeCache` (append-only JSONL)
- `evaluation.prompts`    — `load_template` (versioned prompt files in `evaluation/templates/`)
- `evaluation.scoring`    — folder scoring behind `loraloom eval DIR`
- `evaluation.fakes`    — tiny random CLIP / DINOv2 / LLaVA and a scripted OpenAI-compatible server, for tests

User documentation: docs/evaluation.md.
"""
