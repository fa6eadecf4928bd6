"""The ``dist`` component group: TorchX's builtin ``dist.ddp`` and ``dist.spmd``, plus a positional script.

Users type ``torchx run -s local_cwd dist.ddp -j 1x8 trainer/main.py``; TorchX 0.7.0's builtin
``dist.ddp`` refuses that ("exactly one of --script and -m must be specified") and wants
``--script trainer/main.py``. pyproject's ``[project.entry-points."torchx.components"]`` maps the
``dist`` group to this module, so both forms work. Each component here takes the builtin's exact
signature and ``--help`` and delegates to it; the one difference is that, with neither ``--script``
nor ``-m``, a first positional argument ending in ``.py`` is the script and the rest are its
arguments. Everything else (torchrun command, rendezvous, names, resources, errors) is the
builtin's.

Registering any ``torchx.components`` entry point hides all of TorchX's builtin groups; pyproject
re-registers the ones kept (``metrics``, ``serve``, ``utils``). See docs/torchx.md.
"""
from typing import Dict, List, Optional, Tuple

import torchx
import torchx.specs as specs
from torchx.components import dist as builtin_dist

_POSITIONAL_SCRIPT_NOTE = (
    "A first positional argument ending in ``.py`` is taken as ``--script`` when neither\n"
    "    ``--script`` nor ``-m`` is given: ``torchx run -s local_cwd {component} -j 1x8 trainer/main.py``\n"
    "    is ``torchx run -s local_cwd {component} -j 1x8 --script trainer/main.py``.\n"
)
_POSITIONAL_ARG_NOTE = "; a first argument ending in .py is the script when neither --script nor -m is given"


def _positional_script(
    script: Optional[str], m: Optional[str], script_args: Tuple[str, ...]
) -> Tuple[Optional[str], Tuple[str, ...]]:
    """Returns ``(script, script_args)`` with a leading ``*.py`` argument moved into ``script``.

    Only when neither ``script`` nor ``m`` is set: with either, a ``*.py`` argument is an argument
    to the program (e.g. a config file), and with both or neither left the builtin raises its usual
    error.
    """
    if script is None and m is None and script_args and script_args[0].endswith(".py"):
        return script_args[0], script_args[1:]
    return script, script_args


def _with_note(builtin_doc: Optional[str], component: str, arg_line: str) -> str:
    """The builtin's docstring with the positional-script note after its first paragraph and at
    the end of the ``Args:`` line ``arg_line`` (tests/test_torchx.py checks both landed, so a TorchX
    upgrade that rewords the builtin shows up there)."""
    doc = builtin_doc or ""
    head, sep, rest = doc.partition("\n\n")
    doc = f"{head}{sep}    {_POSITIONAL_SCRIPT_NOTE.format(component=component)}\n{rest}"
    return doc.replace(arg_line, arg_line + _POSITIONAL_ARG_NOTE, 1)


def ddp(
    *script_args: str,
    script: Optional[str] = None,
    m: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "/",
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 1024,
    j: str = "1x2",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    debug: bool = False,
    tee: int = 3,
) -> specs.AppDef:
    # The docstring is the builtin's plus the note (set below), so `--help` matches it.
    script, script_args = _positional_script(script, m, script_args)
    return builtin_dist.ddp(
        *script_args,
        script=script,
        m=m,
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
        mounts=mounts,
        debug=debug,
        tee=tee,
    )


def spmd(
    *args: str,
    script: Optional[str] = None,
    m: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "/",
    h: str = "gpu.small",
    j: str = "1x1",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    # The builtin's docstring plus the note (set below). Its own usage line already shows the
    # positional form, which the builtin then refuses.
    script, args = _positional_script(script, m, args)
    return builtin_dist.spmd(
        *args,
        script=script,
        m=m,
        image=image,
        name=name,
        h=h,
        j=j,
        env=env,
        max_retries=max_retries,
        mounts=mounts,
        debug=debug,
    )


ddp.__doc__ = _with_note(
    builtin_dist.ddp.__doc__,
    "dist.ddp",
    "script_args: arguments to the main module",
)
spmd.__doc__ = _with_note(
    builtin_dist.spmd.__doc__,
    "dist.spmd",
    "args: the arguments to the main module or script (e.g. my/trainer.py -foo bar)",
)
