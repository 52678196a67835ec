"""Wire one rank of the server: groups → model shard → runner → (rank 0) engine + app + uvicorn, else worker.

``run(config)`` is what ``launch/serve.py`` calls on every rank; it returns the process exit code.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from switchyard.log import get_logger
from switchyard.serve.config import ServeConfig

if TYPE_CHECKING:
    from switchyard.parallel.manager import ProcessGroupManager
    from switchyard.serve.workers import ControlChannel

log = get_logger(__name__)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run(config: ServeConfig) -> int:
    import torch.distributed as dist

    from switchyard.serve.loading import context_length, load_for_serving, resolve_model_dir
    from switchyard.hf.patch import moe_layers
    from switchyard.serve.runner import ModelRunner
    from switchyard.serve.workers import ControlChannel, check_heartbeat, worker_loop

    runner = None
    try:  # setup: a user mistake is a message and exit code 2 on every rank, not a traceback
        groups = _process_groups(config.ep)
        if groups.size("edp") > 1:
            log.warning("world %d > ep %d: the %d expert-parallel groups compute the same steps redundantly",
                        groups.world_size, config.ep, groups.size("edp"), ranks=[0])
        channel = ControlChannel()
        check_heartbeat(config.heartbeat_s, channel)
        _check_address(config, channel)
        path = resolve_model_dir(config.model)
        model, tokenizer = load_for_serving(path, groups if groups.world_size > 1 else None, config.dtype, _device(),
                                            config.max_model_len)
        rank = dist.get_rank()
        for layer in moe_layers(model):  # every rank holds every token: each computes its experts' share
            layer.replicated_tokens = True
        runner = ModelRunner(model, count_experts=rank == 0, decode=config.decode, max_batch=config.max_batch,
                             max_model_len=context_length(config.max_model_len, model.config))
        runner.warmup()  # every rank: the graphs (and their all-reduces) are captured together, before serving
    except ValueError as err:
        log.error("serve: %s", err)
        if runner is not None:
            runner.close()
        _destroy_process_group(2)
        return 2
    code = 1  # an exception below: non-zero, whatever the teardown does
    try:
        code = worker_loop(runner, channel) if rank != 0 else _serve_rank0(config, runner, tokenizer, channel, path)
        return code
    finally:
        runner.close()  # graphs that captured NCCL all-reduces go before their communicator does
        _destroy_process_group(code)


def _process_groups(ep: int) -> "ProcessGroupManager":
    """The groups for ``ep``; ``python launch/serve.py --ep N`` (a world of one) is told how to start N ranks."""
    import torch.distributed as dist

    from switchyard.parallel.manager import ProcessGroupManager, init_distributed

    init_distributed()
    world = dist.get_world_size()
    if world == 1 and ep > 1:
        raise ValueError(f"--ep {ep} needs {ep} ranks (or a multiple) but this is one process: start it with "
                         f"`deepspeed --num_gpus {ep} launch/serve.py …`, or leave --ep out")
    if world % ep:  # the layout's own message speaks of tp*dp and etp, which a server has no flags for
        raise ValueError(f"--ep {ep} needs {ep} ranks (or a multiple) but the launcher started {world}: start "
                         f"`deepspeed --num_gpus {ep} launch/serve.py …`, or pass an --ep that divides {world}")
    return ProcessGroupManager(ep=ep, register_with_deepspeed=False)


def _check_address(config: ServeConfig, channel: "ControlChannel") -> None:
    """Rank 0 tries ``host:port`` now, not once the model has loaded (minutes; hours for a large HF directory's
    conversion): a port in use or an address not on this machine is an error on every rank before any weight
    is read. uvicorn binds it for real later (something could take it in between: that is still an error)."""
    import torch.distributed as dist

    problem = [_bind_problem(config.host, config.port) if dist.get_rank() == 0 else None]
    if channel.world_size > 1:
        dist.broadcast_object_list(problem, src=0, group=channel.group)
    if problem[0] is not None:
        raise ValueError(problem[0])


def _bind_problem(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on ``host:port`` (bound as asyncio's ``create_server`` binds), or None."""
    import socket

    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:
        return f"--host {host!r} is not an address of this machine ({err}); use 127.0.0.1 or 0.0.0.0"
    for family, kind, proto, _, address in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (no IPv6): asyncio skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as err:
                return (f"cannot listen on {host}:{port} ({err.strerror}): another server holds the port, or the "
                        "address is not this machine's; stop it or pass another --port / --host")
    return None


def _destroy_process_group(code: int, timeout_s: float = 30.0) -> None:
    """Tear the groups down, but never let a stuck communicator keep a finished rank alive."""
    import torch.distributed as dist

    from switchyard.parallel.manager import release_shm_allreduce_buffer

    release_shm_allreduce_buffer()  # CPU ranks: DeepSpeed never unlinks its all-reduce segment
    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("destroy_process_group did not return within %.0fs; exiting with %d without it", timeout_s, code)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # every rank has stopped; only the teardown hung


def _serve_rank0(config: ServeConfig, runner, tokenizer, channel, path: Path) -> int:
    import uvicorn

    from switchyard.hf.checkpoint import moe_prefixes
    from switchyard.serve.app import create_app
    from switchyard.serve.engine import Engine
    from switchyard.serve.metrics import ServeMetrics
    from switchyard.serve.workers import Rank0Loop

    metrics = ServeMetrics(expert_counts=runner.expert_counts if runner.expert_counts_LE is not None else None,
                           layer_names=moe_prefixes(runner.model))
    engine = Engine(runner, tokenizer, max_batch=config.max_batch, max_model_len=runner.max_model_len,
                    broadcast=channel.send, metrics=metrics)
    name = config.model_id(path)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("%s's tokenizer has no chat template: /v1/chat/completions will answer 400 "
                    "chat_template_missing (/v1/completions works); save a tokenizer with one into it", path)
    app = create_app(engine, tokenizer, name, config, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           access_log=False, timeout_graceful_shutdown=10, lifespan="off"))

    def announce() -> None:  # once uvicorn listens: the port it bound (--port 0 picks one)
        sockets = [sock for listener in server.servers for sock in listener.sockets]
        port = sockets[0].getsockname()[1] if sockets else config.port
        log.info("serving %r (%s) on http://%s:%d/v1 — rank 0 pid %d (SIGTERM it to drain and stop every rank)%s",
                 name, path, config.host, port, os.getpid(), " — API key required" if config.api_key else "")

    return Rank0Loop(engine, channel, server, heartbeat_s=config.heartbeat_s,
                     drain_timeout_s=config.drain_timeout_s, on_started=announce).run()
