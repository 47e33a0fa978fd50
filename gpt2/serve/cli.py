"""The command: `python -m gpt2.serve checkpoint=out/run port=8000` (keys: configs/serve.yaml and
`gpt2.config.ServeConfig`), and the `gpt2-serve` console script. uvicorn runs the app; on SIGTERM or Ctrl-C it
stops taking connections, lets requests in flight finish for up to shutdown_timeout_s, then cancels the rest."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import hydra
import uvicorn

from gpt2.config import ServeConfig, to_object  # importing gpt2.config registers `serve_schema` with Hydra
from gpt2.errors import UserError, exit_on_user_error
from gpt2.resources import CONFIG_DIR
from gpt2.sampling import Sampler
from gpt2.serve.api import create_app
from gpt2.serve.scheduler import Scheduler


def run(cfg: Any) -> None:
    """Serve as `cfg` (a ServeConfig or Hydra DictConfig) says, until SIGTERM or Ctrl-C."""
    cfg = cfg if isinstance(cfg, ServeConfig) else to_object(cfg, ServeConfig)
    sock = listen(cfg.host, cfg.port)  # before loading the model: a port in use fails at once
    sampler = Sampler.load(cfg.checkpoint, cfg.init_from, device=cfg.device, dtype=cfg.dtype, compile=cfg.compile)
    name = cfg.model_name or model_name(cfg.checkpoint, cfg.init_from)
    scheduler = Scheduler(sampler, cfg.batch_size, cfg.max_waiting, cfg.prefill_chunk)
    scheduler.start()
    app = create_app(scheduler, name, cfg.max_tokens)
    host, port = sock.getsockname()[:2]
    print(
        f"serving {name} ({sampler.device}, {str(sampler.dtype).removeprefix('torch.')}) on http://{host}:{port}"
        f" : OpenAI API at /v1, playground at /",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=cfg.shutdown_timeout_s)
    uvicorn.Server(config).run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one UserError line (port in use, unknown address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on accepted sockets that say TCP, and without it
    # a reply written in two pieces (headers, body) waits ~40 ms for a delayed ACK on a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({e.strerror}); stop what uses it or choose another port=..."
        ) from None
    return sock


def model_name(checkpoint: str | None, init_from: str | None) -> str:
    """The id clients name: a checkpoint's run folder (or file stem), else init_from's last path part."""
    if checkpoint:
        path = Path(checkpoint)
        return path.stem if path.suffix == ".pt" else path.resolve().name
    return Path(str(init_from)).name


def main() -> None:
    """Console script `gpt2-serve`: the same command as `python -m gpt2.serve`."""
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="serve")(exit_on_user_error(run))()
