"""`ukgpu demo -m MODEL -p PROMPT`: pull, build (cached), boot, ask once over HTTP, power off."""

from __future__ import annotations

import argparse
import sys
import time

from ukgpu.kernel.image import build as image
from ukgpu.kernel.image import qemu
from ukgpu.llama_core.errors import UkgpuError
from ukgpu.tools.commands.boot import add_vm_options, vm_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="build and boot the VM image, ask it one question",
                                   description="Pull MODEL, build its image (cached by input "
                                   "hash), boot it in QEMU, send PROMPT to /v1/chat/completions, "
                                   "print the answer and timings, power the guest off.")
    parser.add_argument("-m", "--model", default=image.DEFAULT_MODEL,
                        help=f"known model name or .gguf path (default {image.DEFAULT_MODEL})")
    parser.add_argument("-p", "--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=12,
                        help="tokens to generate (default 12: TCG emulation is slow)")
    parser.add_argument("--console", action="store_true", help="show the guest's serial console")
    add_vm_options(parser)
    parser.set_defaults(func=_demo, port=0)


def _say(text: str) -> None:
    print(f"ukgpu: {text}", file=sys.stderr, flush=True)


def _demo(args: argparse.Namespace) -> int:
    import httpx

    start = time.monotonic()
    built = image.build(image.BuildConfig(model=args.model), log=_say)
    build_s = time.monotonic() - start
    _say(f"image {built.dir} ready in {build_s:.1f}s; booting (TCG is slow: about a minute)")
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if args.console else None
    opts = vm_options(args)
    auth = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    with qemu.Vm(built, opts, on_line=echo) as vm:
        ready = vm.wait_ready(args.boot_timeout)
        body = {"model": built.info["model"]["name"], "max_tokens": args.max_tokens,
                "temperature": 0, "messages": [{"role": "user", "content": args.prompt}]}
        asked = time.monotonic()
        resp = httpx.post(vm.url + "/v1/chat/completions", json=body, headers=auth,
                          timeout=args.boot_timeout)
        answer_s = time.monotonic() - asked
        if resp.status_code != 200:
            raise UkgpuError(f"the guest answered {resp.status_code}: {resp.text[:500]}")
        reply = resp.json()
        print(reply["choices"][0]["message"]["content"])
        usage = reply.get("usage", {})
        _say(f"timings: build {build_s:.1f}s, boot to READY {ready['host_seconds']:.1f}s "
             f"(guest: init at {ready.get('boot_to_init', 0):.1f}s, model load "
             f"{ready.get('model_load', 0):.1f}s), completion {answer_s:.1f}s for "
             f"{usage.get('completion_tokens', '?')} tokens")
        code = vm.poweroff(args.stop_timeout)
    _say(f"guest powered off (QEMU exit {code})")
    return 0 if code == 0 else 1
