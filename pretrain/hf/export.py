"""Write a trained decoder memory LM as a Hugging Face ``transformers`` model directory (``pretrain/export_hf.py``).

The directory loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` where only torch
and transformers are installed.  Its code is not a second implementation: ``modeling_memtrain.py`` and
``configuration_memtrain.py`` (templates in this folder) run the project's own fp64 references
(``pretrain/model/reference.py`` and every mechanism's ``reference.py``, named by the registry) and the decoding
loop of ``pretrain/generate.py`` (``pretrain/decoding.py``), copied into the directory with their
``from pretrain.<module> import ...`` lines rewritten to sibling imports (``bundle_sources``).  Every copied file
must import nothing but torch, the standard library and other copied files: the exporter checks it
(``ExportError`` naming the file otherwise).

A directory holds::

    config.json                 MemTrainConfig: the project's model config, layer specs, decode policies, ...
    configuration_memtrain.py   modeling_memtrain.py   memtrain_*.py   (the code, see above)
    model.safetensors           the consolidated fp32 weights under the project's names (+ FAVOR+ projections)
    generation_config.json      greedy by default; EOS = the end-of-document id where the tokenizer has one
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (PreTrainedTokenizerFast), or the
                                sentencepiece model as tokenizer.model
    README.md                   the model card, written from the run
    memtrain_export.json        provenance: source, step, data, tokenizer spec, the evaluation figures found

Sources: an export directory (``SAVE/export``, ``pretrain/engine/export.py``), or a DeepSpeed checkpoint of the
trainer (``SAVE`` with its ``latest`` file, or ``SAVE/iter_NNNNNNN``) of any ZeRO stage and tensor-parallel size:
its shards are joined by ``pretrain.engine.reshard.convert`` (what resuming under another layout uses).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

from pretrain.engine.export import ExportError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TEMPLATES = ("configuration_memtrain.py", "modeling_memtrain.py")
# transformers versions: the remote code uses PretrainedConfig, PreTrainedModel, ModelOutput, ``dtype=`` and the
# auto_map mechanism of trust_remote_code as transformers 5 has them; tested with 5.24
SUPPORTED_TRANSFORMERS = "5.x"
TESTED_TRANSFORMERS = "5.24"
# modules every copied file may import besides the copied files
ALLOWED_IMPORTS = {"torch", "math", "dataclasses", "typing", "__future__", "zlib", "collections", "functools",
                   "itertools"}
# project modules a copied file may name but an export does without: the line becomes ``name = None``
# (ReferenceLM falls back to the registry only when no hooks are passed; the exported model passes them)
PROJECT_ONLY = {"pretrain.model.registry"}
# methods of the config sections the references call, evaluated at export (``MemTrainConfig.section_calls``)
SECTION_CALLS: Dict[str, Dict[str, Callable]] = {
    "compressive": {"slots": lambda cfg, sec: sec.slots(cfg.mem_len)},
    "gated_deltanet": {"widths": lambda cfg, sec: list(sec.widths(cfg.d_head))},
}
ALWAYS_BUNDLED = ("pretrain.model.reference", "pretrain.decoding")


# --------------------------------------------------------------------------------------------------- sources
def module_file(module: str) -> str:
    """The project file of ``module`` (``pretrain.model.reference`` -> ``pretrain/model/reference.py``)."""
    base = os.path.join(ROOT, *module.split("."))
    return base + ".py" if os.path.isfile(base + ".py") else os.path.join(base, "__init__.py")


def bundled_name(module: str) -> str:
    """The file name a project module gets in an export (``pretrain.model.reference`` ->
    ``memtrain_model_reference``)."""
    return "memtrain_" + module.split(".", 1)[1].replace(".", "_")


_FROM = re.compile(r"^(\s*)from\s+(pretrain(?:\.\w+)*)\s+import\s+(.+?)\s*$", re.MULTILINE)


def _rewrite(module: str, text: str, todo: List[str]) -> str:
    """``text`` with its ``from pretrain.X import ...`` lines made sibling imports (queued in ``todo``)."""
    def sub(m):
        indent, target, names = m.group(1), m.group(2), m.group(3)
        full = [f"{target}.{n.strip()}" for n in names.split(",")]
        if all(f in PROJECT_ONLY for f in full) or target in PROJECT_ONLY:
            return "".join(f"{indent}{n.split(' as ')[-1].strip()} = None  # not in an export\n"
                           for n in names.split(",")).rstrip("\n")
        if not os.path.isfile(module_file(target)) or target == "pretrain":
            raise ExportError(f"{module_file(module)}: 'from {target} import {names}': only 'from pretrain.<module> "
                              f"import <names>' can be copied into an export")
        todo.append(target)
        return f"{indent}from .{bundled_name(target)} import {names}"
    return _FROM.sub(sub, text)


def _check_imports(module: str, text: str) -> None:
    """ExportError naming the project file when the rewritten ``text`` imports anything but torch, the standard
    modules of ``ALLOWED_IMPORTS`` and sibling files."""
    for node in ast.walk(ast.parse(text)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for n in names:
            if n.split(".")[0] not in ALLOWED_IMPORTS:
                raise ExportError(f"{module_file(module)}: imports {n!r}, which an exported model directory cannot "
                                  f"rely on (only torch and the code copied beside it); keep the references "
                                  f"torch-only")


def bundle_sources(hook_targets: Dict[str, str]) -> Dict[str, str]:
    """file name -> text of every file the exported model's code needs besides the two templates: the copied
    project modules (``ALWAYS_BUNDLED``, the modules of ``hook_targets`` and everything they import from the
    project, transitively) and ``memtrain_hooks.py``, which imports every hook by name.  ``hook_targets``:
    mechanism name -> ``"module:attribute"`` of its reference (``registry.mechanism(name).reference``)."""
    todo = list(ALWAYS_BUNDLED) + [t.partition(":")[0] for t in hook_targets.values()]
    files: Dict[str, str] = {}
    done = set()
    while todo:
        module = todo.pop(0)
        if module in done:
            continue
        done.add(module)
        with open(module_file(module), encoding="utf-8") as f:
            text = f.read()
        rel = os.path.relpath(module_file(module), ROOT)
        text = _rewrite(module, text, todo)
        _check_imports(module, text)
        files[bundled_name(module) + ".py"] = (f"# Copied from {rel} of the memtrain project by pretrain/export_hf.py "
                                               f"(project imports made sibling imports); edit the project's file.\n"
                                               + text)
    lines = ['"""Every mechanism\'s reference hook by name (written by pretrain/export_hf.py)."""']
    entries = []
    for i, (name, target) in enumerate(sorted(hook_targets.items())):
        module, _, attr = target.partition(":")
        lines.append(f"from .{bundled_name(module)} import {attr} as _hook{i}")
        entries.append(f"    {name!r}: _hook{i},")
    files["memtrain_hooks.py"] = "\n".join(lines + ["", "HOOKS = {"] + entries + ["}", ""])
    return files


# --------------------------------------------------------------------------------------------------- sources
_NOT_DECODER = ("a model of arch {arch!r}: export_hf.py writes decoder-only LMs; a MemBART run's own export "
                "(SAVE/export) is already a BART-format directory (docs/membart.md)")


def _read_checkpoint(path: str) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(model config dict, full fp32 weights, meta) of a trainer checkpoint: ``SAVE`` (its ``latest``) or
    ``SAVE/iter_NNNNNNN``; tensor-parallel and ZeRO shards joined (``reshard.convert``)."""
    import torch

    from pretrain.engine import checkpoint as ckpt
    from pretrain.engine import reshard
    from pretrain.model import ModelConfig, build_model, parallel
    from pretrain.model.weights import described_parameters
    from pretrain.config_base import ConfigError, from_dict
    path = path.rstrip("/")
    if os.path.isfile(os.path.join(path, "memtrain", "meta.json")):
        load_dir, tag = os.path.dirname(path) or ".", os.path.basename(path)
    else:
        load_dir, tag = path, ckpt.read_latest(path)
        if tag is None:
            raise ExportError(f"--model {path}: neither an export directory (model.safetensors, model.yaml, "
                              f"export.json) nor a checkpoint (SAVE with a 'latest' file, or SAVE/iter_NNNNNNN)")
    try:
        meta = ckpt.read_meta(load_dir, tag)
        meta_file = ckpt.meta_path(load_dir, tag)
        if not isinstance(meta.get("model"), dict):
            raise ExportError(f"{meta_file}: no model config in it (written by an older version)")
        if meta["model"].get("arch", "decoder") != "decoder":
            raise ExportError(f"{meta_file}: {_NOT_DECODER.format(arch=meta['model'].get('arch'))}")
        try:
            cfg = from_dict(ModelConfig, meta["model"])
        except (ConfigError, TypeError, ValueError) as e:
            raise ExportError(f"{meta_file}: its model config: {e}") from None
        problem = ckpt.verify(load_dir, tag, meta)
        if problem:
            raise ExportError(f"{os.path.join(load_dir, tag)}: incomplete checkpoint ({problem})")
        if not parallel.is_initialized():
            parallel.initialize(1)
        model = build_model(cfg)
        specs = {name: m.shard for name, (p, m) in described_parameters(model).items()}
        with tempfile.TemporaryDirectory(prefix="memtrain-hf-") as tmp:
            udir = reshard.convert(load_dir, tag, meta, specs, out_dir=os.path.join(tmp, "universal"))
            full = {name: torch.load(os.path.join(udir, "zero", name, "fp32.pt"), weights_only=True)["param"]
                    for name in specs}
    except ckpt.CheckpointError as e:
        raise ExportError(str(e)) from None
    # the trained tensors into the model (shards joined), then its own consolidated view (what exports hold)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in full.items():
            params[name].copy_(t.to(params[name].dtype))
    from pretrain.model.weights import gather_full
    return meta["model"], {k: v.float() for k, v in gather_full(model).items()}, \
        {"step": meta.get("step"), "source": os.path.abspath(os.path.join(load_dir, tag)), "run_dir": load_dir,
         "meta_file": ckpt.meta_path(os.path.abspath(load_dir), tag)}


def read_source(path: str):
    """(ModelConfig, model config dict, full fp32 weights, export meta, tokenizer) of an export directory or a
    checkpoint.  ExportError naming the file or flag on a missing, incomplete or foreign input."""
    from data_tools.tokenization import TokenizerError, load_tokenizer, tokenizer_from_spec
    from pretrain.config_base import ConfigError, from_dict
    from pretrain.engine.export import read_export, read_weights
    from pretrain.model import ModelConfig
    if not os.path.exists(path):
        raise ExportError(f"--model {path}: no such export directory or checkpoint")
    if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, "model.yaml")):
        try:
            with open(os.path.join(path, "export.json"), encoding="utf-8") as f:
                arch = json.load(f).get("arch", "decoder")
        except (OSError, ValueError, AttributeError):
            arch = "decoder"
        if arch != "decoder":           # the trainer's export of MemBART (config.json + export.json)
            raise ExportError(f"--model {path}: {_NOT_DECODER.format(arch=arch)}")
        raise ExportError(f"--model {path}: a Hugging Face model directory (config.json), not a memtrain export "
                          f"or checkpoint: it is already exported (or comes from another tool)")
    if os.path.isfile(os.path.join(path, "model.yaml")) or os.path.isfile(os.path.join(path, "export.json")):
        model_cfg, meta = read_export(path)
        weights = read_weights(path, meta)
        where = os.path.join(path, "model.yaml")
        try:
            tok = tokenizer_from_spec(meta["tokenizer"], os.path.abspath(path))
        except (TokenizerError, ValueError) as e:
            raise ExportError(f"{path}: the export's tokenizer: {e}") from None
    else:
        model_cfg, weights, meta = _read_checkpoint(path)
        run_dir, where = meta.pop("run_dir"), meta.pop("meta_file")
        config_file = os.path.join(run_dir, "config.yaml")
        try:
            import yaml

            from pretrain.engine.data import load_data_info
            with open(config_file) as f:
                run = yaml.safe_load(f) or {}
            data = load_data_info((run.get("data") or {}).get("path"))
            tok = load_tokenizer(data.prefixes["train"])
            spec_dir = tempfile.mkdtemp(prefix="memtrain-hf-tok-")
            meta.update(data=data.prefixes, metric=data.metric, eod_id=data.eod_id, pad_id=data.pad_id,
                        tokenizer=tok.save(os.path.join(spec_dir, "tokenizer")), eval=run.get("eval") or {})
            shutil.rmtree(spec_dir, ignore_errors=True)
        except (OSError, TokenizerError, ConfigError, ValueError) as e:
            raise ExportError(f"{config_file}: cannot find the run's data and tokenizer "
                              f"({' '.join(str(e).split())[:300]})") from None
    try:
        cfg = from_dict(ModelConfig, dict(model_cfg, dropout=0.0, dropatt=0.0))
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise ExportError(f"{where}: {e}") from None
    return cfg, model_cfg, weights, meta, tok


# --------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_files(tok, eod_id: Optional[int]) -> Dict[str, bytes]:
    """The Hugging Face tokenizer files of a project tokenizer: ``tokenizer.json`` (+ ``tokenizer_config.json``,
    ``special_tokens_map.json``) for bytes, characters, words, GPT-2 BPE and Hugging Face tokenizers (ids equal
    ``tok.encode``), the sentencepiece model as it is (``tokenizer.model``, for ``sentencepiece`` itself).
    ValueError for a kind it cannot convert."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import AddedToken
    kind = getattr(tok, "kind", "?")
    special: Dict[str, str] = {}
    if kind == "bytes":
        from tokenizers.pre_tokenizers import ByteLevel
        alphabet = ByteLevel.alphabet()
        table = bytes_to_unicode()
        vocab = {table[b]: b for b in range(256)}
        assert set(vocab) == set(alphabet)
        t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        t.decoder = decoders.ByteLevel()
        if tok.eod_id is not None:
            t.add_special_tokens([AddedToken("<eod>", special=True)])
            special["eos_token"] = "<eod>"
    elif kind in ("vocab", "words"):
        symbols = list(tok.symbols)
        unk = getattr(tok, "unk", None)
        t = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(symbols)}, unk_token=unk))
        if kind == "words":             # one <eos> per newline, words split at white space
            t.normalizer = normalizers.Replace("\n", " <eos> ")
            t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
            t.decoder = decoders.Sequence([decoders.Replace("<eos>", "\n")])
        elif tok.split == "chars":
            t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            t.decoder = decoders.Fuse() if tok.joiner == "" else None
        else:
            t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        if unk is not None:
            special["unk_token"] = unk
        multi = [s for s in symbols if (kind == "vocab" and tok.split == "chars" and len(s) != 1)]
        if multi:
            t.add_special_tokens([AddedToken(s, special=True) for s in multi])
        if getattr(tok, "eod", None) is not None:
            special["eos_token"] = tok.eod
        if getattr(tok, "pad", None) is not None:
            special["pad_token"] = tok.pad
    elif kind == "gpt2":
        t = Tokenizer.from_str(tok._json)
        if tok.eod_id is not None:
            special["eos_token"] = "<|endoftext|>"
    elif kind == "hf":
        with open(tok.path, encoding="utf-8") as f:
            t = Tokenizer.from_str(f.read())
        if getattr(tok, "eod_token", None):
            special["eos_token"] = tok.eod_token
    elif kind == "sentencepiece":
        # as it is: transformers 5's conversion (LlamaTokenizer) skips the model's normaliser and gives other ids
        # for some texts (runs of spaces), so no tokenizer config: load it with sentencepiece itself
        with open(tok.path, "rb") as f:
            return {"tokenizer.model": f.read()}
    else:
        raise ValueError(f"tokenizer kind {kind!r}: no Hugging Face conversion")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "clean_up_tokenization_spaces": False, **special}
    if kind in ("bytes", "vocab", "words"):     # the text "<eod>" is five bytes / characters, as in the project
        config["split_special_tokens"] = True
    return {"tokenizer.json": t.to_str(pretty=True).encode("utf-8"), "tokenizer_config.json": _json_bytes(config),
            "special_tokens_map.json": _json_bytes(special)}


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (what tokenizers' ByteLevel pre-tokenizer maps bytes to; GPT-2's
    ``encoder.py``).  The GPT-2 test fixtures invert it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


# --------------------------------------------------------------------------------------------------- the model
def describe_model(cfg) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(MemTrainConfig fields, extra tensors) of a ModelConfig: layer specs, stack-level memories, the section
    calls, decode policies, and the FAVOR+ projections of its evaluation-mode model (fixed draws)."""
    import torch

    from pretrain.model import build_model, parallel, registry
    if not parallel.is_initialized():
        parallel.initialize(1)
    specs = cfg.layer_specs()
    stack = [m.name for m in registry.stack_memories(cfg)]
    calls = {}
    for section, methods in SECTION_CALLS.items():
        if any(s.mechanism == section for s in specs) or section in stack:
            calls[section] = {name: fn(cfg, getattr(cfg, section)) for name, fn in methods.items()}
    model = build_model(cfg).eval()
    policies = {}
    for key, m in (("0", 0), ("positive", max(1, cfg.mem_len))):
        try:
            model.init_state(1, mem_len=m, device=torch.device("meta"))
            policies[key] = model.decode_policy_for(m)
        except ValueError:
            policies[key] = None
    favor = {}
    for layer in model.stack.layers:
        if getattr(layer.mixer, "feature_map", None) == "favor":
            favor[f"favor_projection.{layer.mixer.index}"] = \
                layer.mixer._favor_projection(torch.device("cpu"), torch.float32).clone()
    fields = {"layer_specs": [{"index": s.index, "code": s.code, "mechanism": s.mechanism, "variant": s.variant,
                               "settings": dict(s.settings)} for s in specs],
              "stack_memories": stack, "absolute_positions": bool(cfg.absolute_positions()), "section_calls": calls,
              "decode_policies": policies, "favor_layers": sorted(int(k.rsplit(".", 1)[1]) for k in favor)}
    return fields, favor


def hook_targets() -> Dict[str, str]:
    """mechanism name -> ``"module:attribute"`` of its reference, for every registered mechanism: every export
    carries the same code (transformers caches remote code by the directory's name, so two exports loaded in one
    process may share it)."""
    from pretrain.model import registry
    return {n: m.reference for n, m in sorted(registry.mechanisms().items()) if m.reference}


def check_transformers() -> str:
    """The installed transformers version; ExportError when it is outside the tested range."""
    try:
        import transformers
    except ImportError:
        raise ExportError("transformers is not installed: pip install 'transformers>=5,<6' (or pip install -e "
                          "'.[hf]')") from None
    v = transformers.__version__
    major = int(re.match(r"\d+", v).group()) if re.match(r"\d+", v) else 0
    if major != 5:
        raise ExportError(f"transformers {v}: not supported (needs {SUPPORTED_TRANSFORMERS}; tested with "
                          f"{TESTED_TRANSFORMERS}): pip install 'transformers>=5,<6'")
    return v


def model_card(cfg, model_cfg: Dict[str, Any], meta: Dict[str, Any], fields: Dict[str, Any], n_params: int,
               tok, evaluation: List[Dict[str, Any]]) -> str:
    """The README.md of the directory, written from the run."""
    from pretrain.model import registry
    layers = registry.signature(cfg.layer_specs())
    mechs = sorted({s["mechanism"] for s in fields["layer_specs"]} | set(fields["stack_memories"]))
    desc = [f"- **{n}**: {registry.mechanism(n).description}" for n in mechs]
    data = meta.get("data") or {}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- memtrain",
        "- memory-augmented", *[f"- {m}" for m in mechs], "---", "",
        f"# memtrain memory LM: {layers}", "",
        "A decoder-only memory-augmented language model trained with the memtrain pipeline (Megatron-core layers, "
        "DeepSpeed) and exported by `pretrain/export_hf.py`.", "",
        "## Mechanism", "", *desc, "",
        f"Layers: `{layers}` ({cfg.n_layer} layers)."
        + (f" Stack-level memories: {', '.join(fields['stack_memories'])}." if fields["stack_memories"] else ""), "",
        "## Shapes", "",
        "| field | value |", "|---|---|",
        *[f"| {k} | {model_cfg.get(k)} |" for k in ("vocab_size", "n_layer", "d_model", "n_head", "d_head",
                                                   "d_inner", "tgt_len", "mem_len", "clamp_len", "pre_lnorm",
                                                   "cutoffs", "div_val", "tie_weight")],
        f"| parameters | {n_params:,} |", "",
        "## Training", "",
        f"- step: {meta.get('step')}", f"- source: `{meta.get('source')}`",
        f"- data: {', '.join(f'{k}=`{v}`' for k, v in data.items()) or 'not recorded'}",
        f"- tokenizer: {tok.describe() if tok is not None and hasattr(tok, 'describe') else 'none'}",
        f"- metric: {meta.get('metric', 'not recorded')}", "",
        "## Evaluation", "",
    ]
    if evaluation:
        lines += ["| file | split | protocol | settings | tokens | loss | ppl/bpc |", "|---|---|---|---|---|---|---|"]
        for r in evaluation:
            metric = r.get("bpc", r.get("ppl"))
            keys = ("tgt_len", "mem_len", "clamp_len", "same_length", "window", "stride")
            settings = ", ".join(f"{k} {r[k]}" for k in keys if k in r)
            lines.append(f"| {r.get('_file')} | {r.get('split')} | {r.get('protocol')} | {settings} | "
                         f"{r.get('scored_tokens')} | {r.get('loss')} | {metric} |")
    else:
        lines.append("No evaluation result was found beside the export (`pretrain/evaluate.py --output` writes one).")
    lines += [
        "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
        "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)"
        if getattr(tok, "kind", "") != "sentencepiece"
        else "tok = sentencepiece.SentencePieceProcessor(model_file=DIR + '/tokenizer.model')  # as in training",
        "out = model(ids)                         # a fresh stream",
        "out = model(next_ids, memory=out.memory) # the memory carried to the next segment",
        "model.generate(ids, max_new_tokens=50)   # segments and memory as in training (pretrain/generate.py)",
        "```", "",
        f"Read text in segments of {cfg.tgt_len} tokens (the training length) with the memory carried. The code "
        "computes in float64 (the project's references); it needs only torch and transformers. Scoring with "
        "lm-evaluation-harness: `python -m pretrain.hf.lm_eval_memtrain --model memtrain --model_args path=DIR "
        "--tasks ...` (docs/huggingface.md of the memtrain project).", "",
    ]
    return "\n".join(lines)


def _evaluations(path: str) -> List[Dict[str, Any]]:
    """Results of ``pretrain/evaluate.py --output`` found in the source directory and its run directory."""
    found = []
    for folder in {os.path.abspath(path), os.path.dirname(os.path.abspath(path))}:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    r = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(r, dict) and "protocol" in r and "loss" in r and "scored_tokens" in r:
                found.append(dict(r, _file=name))
    return found


def export_hf(source: str, output: str, log=print) -> str:
    """Write the Hugging Face model directory ``output`` for the export directory or checkpoint ``source`` (under
    a temporary name, renamed when complete; an earlier export at ``output`` is replaced, anything else there is
    refused: ``check_output``).  Loads it back with ``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)``
    and saves it again, so the files are exactly what ``save_pretrained`` writes.  ExportError (one line, naming
    the file or flag) on bad input."""
    from data_tools.cli import make_folders, remove_folders
    version = check_transformers()
    check_output(source, output)
    cfg, model_cfg, weights, meta, tok = read_source(source)
    fields, favor = describe_model(cfg)
    sources = bundle_sources(hook_targets())
    tensors = {k: v.float().contiguous() for k, v in sorted(weights.items())}
    tensors.update(favor)
    fields["weight_shapes"] = {k: list(v.shape) for k, v in tensors.items()}
    out = os.path.abspath(output)
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    parents = make_folders(os.path.dirname(out))
    os.makedirs(tmp)
    try:
        _write(tmp, out, output, source, cfg, model_cfg, weights, meta, tok, fields, tensors, sources, version, log)
    except BaseException:
        remove_folders(parents)          # the folders made for --output go too: nothing is left of a failure
        raise
    return out


def check_output(source: str, output: str) -> None:
    """ExportError unless ``output`` may be written: it is replaced only when it is missing, an empty directory
    or a directory this exporter wrote (``memtrain_export.json``); never when it holds ``source`` (``--output
    runs/x`` for ``--model runs/x/export`` would delete the training run)."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
        raise ExportError(f"--output {output}: holds --model {source}; replacing it would delete the source "
                          f"(name a new directory)")
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ExportError(f"--output {output}: exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output) and \
            not os.path.isfile(os.path.join(output, "memtrain_export.json")):
        raise ExportError(f"--output {output}: a directory export_hf.py did not write (no memtrain_export.json); "
                          f"only an earlier export is replaced: remove it or name a new directory")


def _write(tmp, out, output, source, cfg, model_cfg, weights, meta, tok, fields, tensors, sources, version,
           log) -> None:
    """The files of the directory, written into ``tmp`` and renamed to ``out`` (``export_hf``)."""
    import torch
    from safetensors.torch import save_file

    from data_tools.cli import staged_dir
    eod = meta.get("eod_id")
    with staged_dir(tmp, out):
        for name in TEMPLATES:
            shutil.copyfile(os.path.join(HERE, name), os.path.join(tmp, name))
        for name, text in sources.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        config = {"architectures": ["MemTrainForCausalLM"], "model_type": "memtrain",
                  "auto_map": {"AutoConfig": "configuration_memtrain.MemTrainConfig",
                               "AutoModelForCausalLM": "modeling_memtrain.MemTrainForCausalLM"},
                  "memtrain": model_cfg, **fields, "eval": meta.get("eval") or {},
                  "vocab_size": cfg.vocab_size, "eos_token_id": eod, "bos_token_id": eod,
                  "pad_token_id": meta.get("pad_id"), "tie_word_embeddings": False}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"do_sample": False, "eos_token_id": eod, "bos_token_id": eod,
                       "pad_token_id": meta.get("pad_id") if meta.get("pad_id") is not None else eod}, f, indent=2)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tok is not None:
            try:
                for name, data in tokenizer_files(tok, eod).items():
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
            except ValueError as e:
                log(f"export_hf.py: warning: no tokenizer written ({e})")
        # load it as a user would, and let transformers write its own files (save -> load -> save is then stable)
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True, dtype=torch.float32)
        except Exception as e:           # the directory just written must load: a failure is a bug, said plainly
            raise ExportError(f"--output {output}: the written directory does not load with transformers {version} "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
        model.save_pretrained(tmp)
        n_params = sum(v.numel() for k, v in weights.items())
        evaluation = _evaluations(source)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(cfg, model_cfg, meta, fields, n_params, tok, evaluation))
        provenance = {"source": os.path.abspath(source), "step": meta.get("step"), "data": meta.get("data"),
                      "tokenizer": meta.get("tokenizer"), "metric": meta.get("metric"), "eod_id": eod,
                      "pad_id": meta.get("pad_id"), "transformers": version, "evaluation": evaluation}
        with open(os.path.join(tmp, "memtrain_export.json"), "w") as f:
            json.dump(provenance, f, indent=2, default=str)
