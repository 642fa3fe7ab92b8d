"""python -m services.ledger — the CostLedger service (default port 50054)."""

from datetime import timedelta

from sophia.ledger.v1 import ledger_pb2, ledger_pb2_grpc

from libs.config import load_config_or_exit
from libs.pricing import PriceTable
from libs.server import run_service
from libs.tls import CallerPolicy, Identity
from services.ledger.ledger import Ledger
from services.ledger.recommendations import RecommendationSettings
from services.ledger.servicer import LedgerServicer
from services.ledger.store import LedgerStore

# Usage and budget checks come from the Gateway alone: a forged RecordUsage charges a tenant.
CALLERS = CallerPolicy(
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"],
    {
        "RecordUsage": {Identity.GATEWAY},
        "RecordUsages": {Identity.GATEWAY},
        "CheckBudget": {Identity.GATEWAY},
        "SetBudget": {Identity.GATEWAY, Identity.OPERATOR},
        "GetUsageReport": {Identity.GATEWAY, Identity.OPERATOR},
        "ListPrices": {Identity.GATEWAY, Identity.OPERATOR},
        "GetRecommendations": {Identity.GATEWAY, Identity.OPERATOR},
    },
)


def main() -> None:
    config = load_config_or_exit()
    store = LedgerStore(config.redis.url, config.ledger.redis_timeout_seconds)
    ledger = Ledger(
        store,
        PriceTable(config.ledger.prices),
        config.ledger.default_alert_percentages,
        advice=RecommendationSettings(
            min_requests=config.ledger.recommendation_min_requests,
            fallback_rate=config.ledger.recommendation_fallback_rate,
            evidence_rows=config.ledger.recommendation_evidence_rows,
        ),
        projection_min_elapsed=timedelta(hours=config.ledger.projection_min_elapsed_hours),
    )
    servicer = LedgerServicer(ledger)

    def register(server):
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(servicer, server)
        return [ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name]

    # NOT_SERVING until Redis answers: the ledger has nothing to serve without it.
    run_service(
        "ledger", config, register, start=store.wait_until_reachable, stop=store.close, callers=CALLERS
    )


if __name__ == "__main__":
    main()
