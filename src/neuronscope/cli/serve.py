"""`neuronscope serve`: start the Monitor web app (FastAPI + a static page) for a model and its atlas."""
from __future__ import annotations

from typing import Optional

import typer

from .common import DeviceOpt, DtypeOpt, GgufOpt, ModelArg, console, load_subject


def serve(model: Optional[str] = ModelArg, atlas: Optional[str] = typer.Option(
              None, "--atlas", help="Atlas folder of this model (decodes, corpus statistics, descriptions)."),
          host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
          port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
          session_ttl: float = typer.Option(1800.0, "--session-ttl", help="Seconds before an idle session expires."),
          allow_host: Optional[list[str]] = typer.Option(
              None, "--allow-host", help="Also answer requests whose Host header names this (repeatable; '*': any). "
                                         "By default only the bound address (and localhost names for a loopback "
                                         "bind) are accepted, against DNS rebinding."),
          threads: int = typer.Option(
              1, "--threads", help="torch threads per model call. 1 (the default) runs one call per core at once "
                                   "(a view beside a streaming answer, each on its own core); 0: torch's default, "
                                   "with one call at a time."),
          stall_steps: float = typer.Option(
              1.0, "--stall-steps", help="When more calls wait than run at once (they then share packed "
                                         "forwards): how many decoding steps one session's work (a view, a prefill) "
                                         "may add to another session's streaming answer, per token. More: views run "
                                         "faster while answers stream."),
          gguf_file: Optional[str] = GgufOpt, dtype: str = DtypeOpt, device: Optional[str] = DeviceOpt) -> None:
    """Start the Monitor: chat with the model, watch neurons fire, attribute tokens, steer by concept.

    Example: neuronscope serve ../shared/models/stories260k --atlas atlas/stories260k --port 8000
    """
    import gc
    import socket

    import uvicorn

    from ..errors import NeuronscopeError
    from ..server import Knowledge, Monitor, SessionStore, create_app
    from ..server.guard import host_names

    if not 0 <= port <= 65535:
        raise NeuronscopeError(f"Port {port} is out of range (0 to 65535).")
    if not session_ttl > 0:
        raise NeuronscopeError("--session-ttl must be a positive number of seconds.")
    if threads < 0:
        raise NeuronscopeError(f"--threads must be 0 (torch's default) or a positive number, got {threads}.")
    import torch
    if threads:
        torch.set_num_threads(threads)
    subject = load_subject(model, gguf_file, dtype, device)
    knowledge = Knowledge.load(subject, atlas)
    mon = Monitor(subject, knowledge, stall_steps=stall_steps)
    mon.sessions = SessionStore(ttl=session_ttl, max_sessions=mon.limits.max_sessions,
                                max_per_client=mon.limits.max_sessions_per_client)
    allowed = host_names(host, allow_host or ())
    app = create_app(mon, allowed_hosts=allowed)
    import threading
    def warm() -> None:
        mon.warm()
        # the tables warm() read (descriptions, vocabulary: ~450K objects on SmolLM2) live as long as the server:
        # out of the collector's sight, a full collection no longer holds the GIL for ~0.2 s in the middle of a
        # streaming answer
        gc.freeze()
    threading.Thread(target=warm, daemon=True, name="monitor-warm").start()
    for note in knowledge.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise NeuronscopeError(f"Cannot listen on {host}:{port} ({exc.strerror}); pick another --port.") from None
    sock.listen(128)  # connections made right after the URL is printed wait in the backlog, not refused
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    console.print(f"Monitor for {subject.name} at [bold]http://{shown}:{real_port}/[/bold]  (Ctrl+C to stop)",
                  highlight=False, soft_wrap=True)
    console.print(f"{mon.model_lock.slots} model call(s) at once, {torch.get_num_threads()} torch thread(s) each",
                  highlight=False)
    if allowed is None:
        console.print("[yellow]note:[/yellow] any Host header is accepted (wildcard bind or --allow-host '*').")
    config = uvicorn.Config(app, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
