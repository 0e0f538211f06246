"""Export a trained decoder memory LM as a Hugging Face ``transformers`` model directory.

    python pretrain/export_hf.py --model runs/lamemo/export --output hf/lamemo
    python pretrain/export_hf.py --model runs/lamemo --output hf/lamemo        # the latest checkpoint (any TP/ZeRO)

The directory loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(DIR)`` where only torch and transformers are installed; the memory is an explicit
argument of ``forward`` and ``generate`` reads text as ``pretrain/generate.py`` does (docs/huggingface.md).  The
directory is written under a temporary name and renamed when complete.
"""
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import sys

from data_tools.cli import CommandParser, fail, run_interruptible

PROG = "export_hf.py"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="export directory (SAVE/export) or checkpoint (SAVE, or SAVE/iter_NNNNNNN) of a training run")
    p.add_argument("--output", required=True,
                   help="the Hugging Face model directory to write (an earlier export there is replaced)")
    return p


def main(argv=None) -> int:
    """The command: prints where the directory went; exit status 0, 2 on bad input (one line on stderr naming the
    flag or file), 130 when interrupted."""
    return run_interruptible(PROG, _export, build_parser().parse_args(argv), what="nothing written")


def _export(args) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    from pretrain.engine.export import ExportError
    from pretrain.hf.export import export_hf
    try:
        out = export_hf(args.model, args.output, log=lambda m: print(m, file=sys.stderr))
    except ExportError as e:
        return fail(PROG, e)
    except OSError as e:                # a disk full or a folder that cannot be written: one line naming it
        return fail(PROG, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e} (nothing written)")
    print(f"wrote {out} (AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
