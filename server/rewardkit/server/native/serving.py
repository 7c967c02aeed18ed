"""The native API's work: scalar and ABC dense results for ``/v1/rewards``, the model card for ``/v1/models``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Response

from rewardkit.core.abc import project_to_spans
from rewardkit.core.formatting import ScoreItem
from rewardkit.server.compose.serving import ModelRegistry
from rewardkit.server.errors import BadRequest
from rewardkit.server.native.protocol import (
    ComponentCard,
    DenseReward,
    ItemResult,
    ModelCard,
    ModelList,
    RewardRequest,
    RewardResponse,
)
from rewardkit.server.protocol import Usage
from rewardkit.server.runs import RUN, RunTag
from rewardkit.server.service import RewardService, encode_vector, set_score_headers, to_score_item


async def rewards(registry: ModelRegistry, req: RewardRequest, response: Response) -> RewardResponse:
    """Score items with one model (``model``, default the first), or compose models and components (``rewards``);
    with ``dense: true`` also return ABC token-level reward vectors."""
    use_run(req.run_id, req.step)
    items = [to_score_item(it) for it in req.items]
    if req.rewards is not None:
        return await composed(registry, req, items, response)
    service = registry.pick(req.model)
    if req.dense:
        results = await score_dense(service, req, items)
    else:
        scored = await service.score(items, truncate=req.truncate)
        results = [ItemResult(index=i, reward=s.score.reward, num_tokens=s.score.num_tokens,
                              truncated=s.score.truncated) for i, s in enumerate(scored)]
    set_score_headers(response, service)
    return RewardResponse(model=service.rm.model_id, head_version=service.head_version,
                          rewards=[r.reward for r in results], results=results,
                          usage=Usage(total_tokens=sum(r.num_tokens for r in results)))


async def composed(registry: ModelRegistry, req: RewardRequest, items: Sequence[ScoreItem],
                   response: Response) -> RewardResponse:
    """``rewards: {name: weight}``: the weighted sum per item, each part's value, errors per item and part."""
    assert req.rewards is not None
    parts = registry.resolve(req.rewards)
    done = await registry.compose(parts, items, [it.reference for it in req.items], req.truncate)
    results = [ItemResult(index=i, reward=c.reward, num_tokens=c.num_tokens, truncated=c.truncated,
                          components=c.components, errors=c.errors or None) for i, c in enumerate(done)]
    model, version = registry.label(parts)
    response.headers["x-rewardkit-model"] = model
    response.headers["x-rewardkit-head-version"] = version
    return RewardResponse(model=model, head_version=version, rewards=[r.reward for r in results], results=results,
                          weights={p.name: p.weight for p in parts},
                          usage=Usage(total_tokens=sum(r.num_tokens for r in results)))


async def score_dense(service: RewardService, req: RewardRequest, items: Sequence[ScoreItem]) -> list[ItemResult]:
    """ABC dense rewards for ``POST /v1/rewards`` with ``dense: true`` (see rewardkit.core.abc and docs/abc.md).

    Per item: the scalar reward and the vector over the RM's response tokens (their text and character spans in
    the response), or, with ``response_token_spans``, the vector projected onto the caller's spans.
    """
    done = await service.dense(items, req.beta, req.truncate, "items", [it.response_token_spans for it in req.items])
    results = []
    for i, (_enc, s, d, sp) in enumerate(done):
        if sp is None:
            dense = DenseReward(token_rewards=encode_vector(d.token_rewards, req.encoding_format), tokens=d.tokens,
                                spans=d.spans, beta=d.beta)
        else:
            dense = DenseReward(token_rewards=encode_vector(project_to_spans(d, sp), req.encoding_format),
                                tokens=None, spans=sp, beta=d.beta)
        results.append(ItemResult(index=i, reward=s.reward, num_tokens=s.num_tokens, truncated=s.truncated,
                                  dense=dense))
    return results


def use_run(run_id: str | None, step: int | None) -> None:
    """The body's ``run_id`` / ``step`` replace the headers' for this request (``runs.RUN``)."""
    if run_id is None and step is None:
        return
    tag = RUN.get()
    if run_id is None:
        if tag is None:
            raise BadRequest("step needs run_id (or the x-rewardkit-run header): a step belongs to a run", field="step")
        run_id = tag.run_id
    RUN.set(RunTag(run_id, step if step is not None else (tag.step if tag and tag.run_id == run_id else None)))


def model_list(registry: ModelRegistry) -> ModelList:
    """Every served model's card (the first is the default), the components, the compatibility default."""
    return ModelList(data=[model_card(name, svc) for name, svc in registry.services()],
                     components=[ComponentCard(name=c.name, kind=c.kind, description=c.describe(),
                                               needs_reference=c.needs_reference, config=c.config())
                                 for c in registry.components.values()],
                     default_rewards=registry.default_rewards)


def model_card(name: str, service: RewardService) -> ModelCard:
    """One model's card: id, head version, trained or not, what it scores, limits and normalisation."""
    rm = service.rm
    desc = rm.meta.description or ("trained reward model" if rm.meta.trained else "")
    if not rm.meta.trained:
        desc = "UNTRAINED reward head: " + desc
    return ModelCard(
        id=rm.model_id, head_version=service.head_version, trained=rm.meta.trained, description=desc,
        max_length=service.settings.max_length, dtype=str(rm.dtype).replace("torch.", ""), device=str(rm.device),
        reward_token_rule=rm.meta.reward_token_rule, norm_mean=rm.meta.norm_mean, norm_std=rm.meta.norm_std,
        readout=rm.meta.readout, readout_layer=rm.meta.readout_layer, ll_weight=rm.meta.ll_weight, name=name)
