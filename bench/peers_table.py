#!/usr/bin/env python3
"""Results table of bench/run-peers.sh: medians of the rounds per server, ratios against
each peer. Usage: peers_table.py RESULTS_DIR RUNS SERVER..."""

import json
import statistics
import sys

LABELS = {
    "gateway": "gateway-uring io_uring, 1 shard",
    "gateway-epoll": "gateway-uring epoll, 1 shard",
    "gateway-2core": "gateway-uring io_uring, 2 shards (both cores, shared with the client)",
    "gateway-signal": "gateway-uring io_uring, 1 shard, task run: signal (kernel default)",
    "gateway-coop": "gateway-uring io_uring, 1 shard, task run: coop",
    "gateway-before": "gateway-uring io_uring, 1 shard, before (GATEWAY_BEFORE_BIN)",
    "gateway-epoll-before": "gateway-uring epoll, 1 shard, before (GATEWAY_BEFORE_BIN)",
    "tungstenite": "tokio + tokio-tungstenite",
    "fastwebsockets": "tokio + fastwebsockets",
    "node-ws": "Node ws",
    "uws": "uWebSockets.js",
}
GATEWAYS = ("gateway", "gateway-epoll", "gateway-2core", "gateway-before", "gateway-epoll-before",
            "gateway-signal", "gateway-coop")


def load(results, server, kind, runs):
    rounds = []
    for i in range(1, runs + 1):
        base = f"{results}/{server}-{kind}-{i}"
        try:
            client = json.load(open(f"{base}.json"))
            srv = json.load(open(f"{base}.server.json"))
        except FileNotFoundError:
            continue
        client.update(srv)
        rounds.append(client)
    return rounds


def med(rounds, f):
    return statistics.median(f(r) for r in rounds) if rounds else float("nan")


def main():
    results, runs, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    rows = {}
    for s in servers:
        sat, rate = load(results, s, "sat", runs), load(results, s, "rate", runs)
        if not sat:
            continue
        window = sat[0]["warmup_seconds"] + sat[0]["seconds"]
        rows[s] = {
            "pps": med(sat, lambda r: r["pongs_per_second"]),
            "runs": [round(r["pongs_per_second"]) for r in sat],
            # Server CPU over the client's whole run (connect, warm-up, measure) per pong
            # received in it.
            "cpu_us": med(sat, lambda r: 1e6 * r["server_cpu_seconds"] / max(r["pongs_total"], 1)),
            "server_cores": med(sat, lambda r: r["server_cpu_seconds"] / window),
            "client_cores": med(sat, lambda r: r["client_cpu_seconds"] / window),
            "sat_p50": med(sat, lambda r: r["latency_us"]["p50"]),
            "sat_p99": med(sat, lambda r: r["latency_us"]["p99"]),
            "errors": sum(sum(r["errors"].values()) for r in sat + rate),
            "rate": med(rate, lambda r: r["rate"]),
            "rate_pps": med(rate, lambda r: r["pongs_per_second"]),
            "p50": med(rate, lambda r: r["latency_us"]["p50"]),
            "p99": med(rate, lambda r: r["latency_us"]["p99"]),
            "sp50": med(rate, lambda r: r["service_latency_us"]["p50"]),
            "sp99": med(rate, lambda r: r["service_latency_us"]["p99"]),
            "loadavg": [r["loadavg"].split()[0] for r in sat],
        }
    first = load(results, servers[0], "sat", runs)[0]
    print(f"{first['connections']} connections, {first['in_flight']} pings in flight each "
          f"(saturation), {first['warmup_seconds']} s warm-up + {first['seconds']} s measured, "
          f"median of {runs} rounds. Results: {results}")
    print()
    print("| server | pongs/s at saturation | rounds | server CPU µs/pong | server cores busy | "
          "client cores busy | open loop at 50 %: pongs/s | p50 µs | p99 µs | "
          "p50 / p99 µs from actual send | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s, r in rows.items():
        print(f"| {LABELS.get(s, s)} | {r['pps']:,.0f} | {', '.join(f'{x:,}' for x in r['runs'])} | "
              f"{r['cpu_us']:.2f} | {r['server_cores']:.2f} | {r['client_cores']:.2f} | "
              f"{r['rate_pps']:,.0f} (target {r['rate']:,.0f}) | {r['p50']:,.0f} | {r['p99']:,.0f} | "
              f"{r['sp50']:,.0f} / {r['sp99']:,.0f} | {r['errors']} |")
    peers = [s for s in rows if s not in GATEWAYS]
    gateways = [s for s in rows if s in GATEWAYS]
    if peers and gateways:
        print()
        print("Gateway vs each peer (pongs/s at saturation ratio; server CPU per pong ratio, "
              "peer ÷ gateway, >1 means the gateway spends less):")
        print()
        print("| gateway | " + " | ".join(LABELS.get(p, p) for p in peers) + " |")
        print("|---|" + "---|" * len(peers))
        for g in gateways:
            cells = []
            for p in peers:
                cells.append(f"{rows[g]['pps'] / rows[p]['pps']:.2f}× / "
                             f"{rows[p]['cpu_us'] / rows[g]['cpu_us']:.2f}×")
            print(f"| {LABELS.get(g, g)} | " + " | ".join(cells) + " |")
        best = max(peers, key=lambda p: rows[p]["pps"])
        print()
        print(f"Best peer by pongs/s: {LABELS.get(best, best)} ({rows[best]['pps']:,.0f}); "
              f"goal gateway (1 shard) ≥ 1.5× it: "
              + (f"{rows['gateway']['pps'] / rows[best]['pps']:.2f}×" if "gateway" in rows else "n/a"))
    print()
    print("loadavg (1 min) at each saturation round's start: "
          + "; ".join(f"{s} {', '.join(r['loadavg'])}" for s, r in rows.items()))
    json.dump(rows, open(f"{results}/summary.json", "w"), indent=2)


if __name__ == "__main__":
    main()
