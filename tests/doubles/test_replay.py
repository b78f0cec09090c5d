"""The replay provider (`doubles.replay`): recorded answers served over the OpenAI API, with the
recorded cost in the usage; a prompt it has no recording for is a 404."""

import httpx

from connectors.recordings import Recordings, load
from doubles.replay import create_app
from tests.support import write_bench


async def test_replay_provider_serves_recorded_answers_over_the_openai_api(tmp_path):
    records = load(
        write_bench(
            tmp_path / "arc_challenge_train.csv", [dict(gold="A", **{"cheap-a": "B", "cheap-b": "A", "big": "A"})]
        )
    )
    app = create_app(Recordings(records))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replay") as client:
        body = {"model": "cheap-a", "messages": [{"role": "user", "content": records[0].prompt}]}
        answer = (await client.post("/v1/chat/completions", json=body)).json()
        assert answer["choices"][0]["message"]["content"] == "B" and answer["usage"]["cost_usd"] == 1.0
        unknown = await client.post(
            "/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "?"}]}
        )
        assert unknown.status_code == 404
