"""What the demo prints once the daemon is READY: where things are, and commands to paste.

Pure text, built from the layout and the addresses; every path in a command is quoted for
the shell, so a runtime directory or a venv with a space in its path still pastes right.
A test runs each printed command as printed.
"""

from __future__ import annotations

import json
import shlex
import sys

from openclawd.demo.layout import (
    ANTHROPIC,
    CLIENT,
    CLIENT_TOKENS_PER_MINUTE,
    MODEL,
    PROVIDER,
    REFRESH_INTERVAL_S,
    VAULT_MOUNT,
    VAULT_PATH,
    Layout,
)

_WS_SNIPPET = """\
{python} - <<'EOF'
import json, trio, trio_websocket
async def main():
    stream = await trio.open_unix_socket({socket})
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "openclawd", "/v1/ws")
        print(json.loads(await ws.get_message()))
        body = {{"model": "{model}", "stream": True, "stream_options": {{"include_usage": True}},
                "messages": [{{"role": "user", "content": "Hi"}}]}}
        await ws.send_message(json.dumps({{"type": "request", "id": "r1", "provider": "{provider}",
                                          "path": "/v1/chat/completions", "body": body}}))
        while True:
            frame = json.loads(await ws.get_message())
            print(frame)
            if frame["type"] in ("response.end", "error"):
                break
        await ws.aclose()
trio.run(main)
EOF"""


# The SDK examples are typed: mypy --strict passes on each (a test checks).
_OPENAI_SNIPPET = """\
{python} - <<'EOF'
import httpx2
import openai
with httpx2.Client(transport=httpx2.HTTPTransport(uds={socket})) as http:
    client = openai.OpenAI(
        api_key="unused",  # the SDK wants one; the daemon drops it and adds the real key
        base_url="http://openclawd/v1/http/{provider}/v1",
        http_client=http,
    )
    stream = client.chat.completions.create(
        model="{model}", messages=[{{"role": "user", "content": "Hi"}}], stream=True
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
EOF"""

_REALTIME_SNIPPET = """\
{python} - <<'EOF'
import json
from websockets.sync.client import unix_connect
with unix_connect({socket}, "ws://openclawd/v1/realtime/{provider}?model=gpt-realtime") as ws:
    print(json.loads(ws.recv())["type"])
    ws.send(json.dumps({{"type": "response.create"}}))
    while (event := json.loads(ws.recv()))["type"] != "response.done":
        if event["type"] == "response.output_text.delta":
            print(event["delta"], end="", flush=True)
    print()
    print(event["response"]["usage"])
EOF"""

_ANTHROPIC_SNIPPET = """\
{python} - <<'EOF'
import anthropic
import httpx2
with httpx2.Client(transport=httpx2.HTTPTransport(uds={socket})) as http:
    client = anthropic.Anthropic(
        api_key="unused",  # the SDK wants one; the daemon drops it and adds the real key
        base_url="http://openclawd/v1/http/{provider}",
        http_client=http,
    )
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=200, messages=[{{"role": "user", "content": "Hi"}}]
    ) as stream:
        for text in stream.text_stream:
            print(text, end="", flush=True)
        print()
        print(stream.get_final_message().usage)
EOF"""


def guide(layout: Layout, *, vault_addr: str, root_token: str, bao: str, mock_port: int) -> str:
    """The text printed on READY."""
    data = shlex.quote(str(layout.data_socket))
    control = shlex.quote(str(layout.control_socket))
    body = json.dumps(
        {
            "model": MODEL,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Hi"}],
        }
    )
    big = json.dumps(
        {
            "model": MODEL,
            "max_tokens": 2 * CLIENT_TOKENS_PER_MINUTE,
            "messages": [{"role": "user", "content": "Hi"}],
        }
    )
    ws = _WS_SNIPPET.format(
        python=shlex.quote(sys.executable),
        socket=json.dumps(str(layout.data_socket)),
        model=MODEL,
        provider=PROVIDER,
    )
    snippet = {
        "python": shlex.quote(sys.executable),
        "socket": json.dumps(str(layout.data_socket)),
        "provider": PROVIDER,
        "model": MODEL,
    }
    sdk = _OPENAI_SNIPPET.format(**snippet)
    realtime = _REALTIME_SNIPPET.format(**snippet)
    claude = _ANTHROPIC_SNIPPET.format(**{**snippet, "provider": ANTHROPIC})
    return f"""
openclawd demo is ready.

  data socket     {layout.data_socket}
  control socket  {layout.control_socket}
  Vault (dev)     {vault_addr}  root token {root_token}  key: {VAULT_MOUNT}/{VAULT_PATH}
  mock provider   http://127.0.0.1:{mock_port}  accepts only the key Vault holds now
  daemon config   {layout.config}

For the README's app examples (providers openai and anthropic), in that terminal:
export OPENCLAWD_SOCKET={data}

Paste these into another terminal.

# the daemon's status: state, key version and fingerprint, Vault, upstream
curl -sS --unix-socket {control} http://openclawd/v1/status; echo

# a streamed chat completion through /v1/http (curl and the openai SDK work unchanged)
curl -sS -N --unix-socket {data} \\
  http://openclawd/v1/http/{PROVIDER}/v1/chat/completions \\
  -H 'content-type: application/json' -d '{body}'

# the same over the /v1/ws channel, from Python
{ws}

# the same with the openai SDK (its http_client over the socket); typed: mypy --strict passes
{sdk}

# a realtime session through /v1/realtime. The openai SDK's realtime client cannot be given
# a unix socket through its public API, so this uses the websockets library, which can
{realtime}

# Anthropic's Messages API with the anthropic SDK: provider {ANTHROPIC} (preset = "anthropic")
{claude}

# rotate the key in Vault: the mock refuses the old key from now on, and the daemon follows
# (at its next poll, within {REFRESH_INTERVAL_S:g} s, or at once when the mock answers 401).
# Run the curl lines again: the answer names key version 2; the log shows key.rotated.
printf 'sk-demo-%s' "$(date +%s%N)" | BAO_ADDR={vault_addr} BAO_TOKEN={root_token} \\
  {shlex.quote(bao)} kv put -mount={VAULT_MOUNT} {VAULT_PATH} api_key=-

# metrics, as Prometheus scrapes them
curl -sS --unix-socket {control} http://openclawd/metrics | grep ^openclawd_

# token control: a request that asks for more than client {CLIENT}'s tokens_per_minute
# ({CLIENT_TOKENS_PER_MINUTE}) is refused before it reaches the provider: 429 rate_limited
curl -sS --unix-socket {data} \
  http://openclawd/v1/http/{PROVIDER}/v1/chat/completions \
  -H 'content-type: application/json' -d '{big}'; echo

# what client {CLIENT} and the provider have used of their limits
curl -sS --unix-socket {control} http://openclawd/v1/limits; echo

Press Ctrl-C to drain the daemon and stop everything the demo started.
"""
