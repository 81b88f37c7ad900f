"""`gpuctl cost report|simulate`: what the GPU cost, and what another idle window would have cost."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.cli import state
from gpuctl.cli._output import OutputOpt, Renderer, out_console, quiet_opt

if TYPE_CHECKING:
    from gpuctl.services.cost import CostReport

__all__ = ["app"]

app = typer.Typer(help="What the GPU cost: billed, busy, boot and idle time, and money.", no_args_is_help=True)

SinceOpt = Annotated[str, typer.Option("--since", help="How far back: 12h, 7d, 30d.")]
PriceOpt = Annotated[float | None, typer.Option(
    "--hourly-price", help="The instance's price per hour (default: the shipped us-east-1 on-demand table).")]
#: Width of the longest bar of the daily chart, in characters.
BAR_WIDTH = 40


@app.command("report")
def report(
    ctx: typer.Context,
    since: SinceOpt = "30d",
    by: Annotated[str | None, typer.Option(
        "--by", help="Group by day or job-type (doctor's canaries are their own group).")] = None,
    hourly_price: PriceOpt = None,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the total cost (the billed GPU-hours when no price is known)")] = False,
) -> None:
    """Show what the GPU instance cost: billed time from its recorded state changes (per second, one minute
    minimum per start), busy GPU time, boot and idle time, EBS while stopped, and the money.

    In fleet mode: every instance of the group, each at its own type's price, with a line per instance.

    -q prints the total cost (or the billed GPU-hours when no price is known).

    Examples:

        gpuctl cost report

        gpuctl cost report --since 7d --by day

        gpuctl cost report --by job-type --hourly-price 0.75 --output json | jq .groups
    """
    from gpuctl.services.cost import cost_report
    from gpuctl.services.jobs import parse_duration

    out = state(ctx).renderer(output, quiet)
    seconds = parse_duration(since, option="--since")
    found = cost_report(state(ctx).gateways, since_seconds=seconds, by=by, hourly=hourly_price)
    for warning in found.warnings:
        out.warn(warning)
    if out.json:
        out.data(found.document())
        return
    totals = found.totals()
    if out.quiet:
        out.ids([str(totals["cost"] if totals["cost"] is not None else totals["gpu_hours"])])
        return
    _render(out, found, totals)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def _render(out: Renderer, found: CostReport, totals: dict[str, Any]) -> None:
    from gpuctl.times import iso

    billed = totals["billed_seconds"]

    def part(name: str) -> str:
        share = f" ({totals[name] / billed:.0%})" if billed else ""
        return _hours(totals[name]) + share

    ebs = found.ebs_stopped()
    instances = found.instances()
    if found.fleet_group:
        types = sorted({i["instance_type"] or "unknown type" for i in instances})
        what = ("instance", f"fleet {found.fleet_group}: {len(instances)} instance(s) ({', '.join(types) or '-'})")
    else:
        what = ("instance", f"{found.instance_id} ({found.instance_type or 'unknown type'})")
    if found.price is not None:
        price = f"{_money(found.price)}/h — {found.price_source}"
    elif found.fleet_group and found.priced and instances:
        price = found.price_source
    else:
        price = "unknown (pass --hourly-price)" if found.fleet_group else found.price_source
    out.pairs([
        what,
        ("window", f"{iso(found.since)} to {iso(found.until)}"),
        ("price", price),
        ("billed", f"{_hours(billed)} in {totals['starts']} start(s)"),
        ("busy", part("busy_seconds")),
        ("boot", part("boot_seconds")),
        ("idle", f"{part('idle_seconds')}, of which idle tail {_hours(totals['idle_tail_seconds'])}"),
        ("jobs", f"{totals['jobs']} timed ({sum(1 for j in found.jobs if j['canary'])} of them doctor's canaries), "
                 f"{totals['jobs_untimed']} without started_at"),
        ("GPU cost", _money(totals["cost"])),
        ("EBS while stopped", f"{_money(ebs['cost'])} ({sum(ebs['volumes_gb'].values())} GB, "
                              f"{_hours(ebs['stopped_seconds'])})"),
    ])
    if found.fleet_group and instances:
        out.table(["instance", "type", "price", "billed", "busy", "starts", "cost"],
                  [[i["instance_id"], i["instance_type"] or "-", _money(i["hourly_price"]), _hours(i["billed_seconds"]),
                    _hours(i["busy_seconds"]), i["starts"], _money(i["cost"])] for i in instances])
    if found.by == "job-type":
        out.table(["job type", "jobs", "GPU", "boot share", "idle share", "charged", "cost"],
                  [[g["job_type"], g["jobs"], _hours(g["gpu_seconds"]), _hours(g["boot_share_seconds"]),
                    _hours(g["idle_share_seconds"]), _hours(g["charged_seconds"]), _money(g["cost"])]
                   for g in found.job_types()])
    days = found.days()
    if found.by == "day" or len(days) > 1:
        _chart(days)


def _chart(days: list[dict[str, Any]]) -> None:
    """One bar per day: busy (█), boot (▓), idle (░), scaled to the busiest day."""
    console = out_console()
    peak = max((d["billed_seconds"] for d in days), default=0)
    if not peak:
        return
    console.print("per day: █ busy  ▓ boot  ░ idle", highlight=False)
    for d in days:
        cells = {name: round(d.get(f"{name}_seconds", 0) / peak * BAR_WIDTH) for name in ("busy", "boot", "idle")}
        bar = "█" * cells["busy"] + "▓" * cells["boot"] + "░" * cells["idle"]
        console.print(f"{d['day']}  {bar:<{BAR_WIDTH}}  {_hours(d['billed_seconds'])}  {_money(d['cost'])}",
                      highlight=False, soft_wrap=True)


@app.command("simulate")
def simulate(
    ctx: typer.Context,
    idle: Annotated[str, typer.Option("--idle", help="Idle windows to compare, comma-separated.")] = "5m,15m,30m,60m",
    since: SinceOpt = "30d",
    hourly_price: PriceOpt = None,
    max_p95_wait: Annotated[float, typer.Option(
        "--max-p95-wait", min=0, help="Recommend the cheapest window with a p95 extra wait up to this (s).")] = 120.0,
    jobs_per_instance: Annotated[int, typer.Option(
        "--jobs-per-instance", help="Fleet mode: the stack's FleetJobsPerInstance, as the replay's scheduler "
        "sizes the group.")] = 4,
    output: OutputOpt = None,
    quiet: Annotated[bool, quiet_opt("the recommended idle window, in minutes")] = False,
) -> None:
    """Replay the recorded jobs (arrival, measured run and boot times) through the scheduler's own decision code
    under each idle window: GPU-hours, money, cold starts, extra wait per job (p50/p95), and a recommendation.

    -q prints the recommended idle window in minutes.

    Examples:

        gpuctl cost simulate

        gpuctl cost simulate --idle 10m,20m,45m --since 14d --output json
    """
    from gpuctl.services.jobs import parse_duration
    from gpuctl.services.simulate import parse_windows
    from gpuctl.services.simulate import simulate as run

    out = state(ctx).renderer(output, quiet)
    windows = parse_windows(idle)
    result = run(state(ctx).gateways, windows=windows, since_seconds=parse_duration(since, option="--since"),
                 hourly=hourly_price, max_p95_wait=max_p95_wait, jobs_per_instance=jobs_per_instance)
    for warning in result.warnings:
        out.warn(warning)
    doc = result.document()
    best = doc["recommended_idle_window_seconds"]
    if out.json:
        out.data(doc)
        return
    if out.quiet:
        out.ids([f"{best / 60:g}" if best is not None else ""])
        return
    out.table(["idle window", "GPU-hours", "cost", "cold starts", "extra wait p50", "extra wait p95"],
              [[f"{w['idle_window_seconds'] / 60:g} min" + (" *" if w["idle_window_seconds"] == best else ""),
                f"{w['gpu_hours']:.2f}", _money(w["cost"]), w["cold_starts"], f"{w['extra_wait_p50_seconds']:.0f} s",
                f"{w['extra_wait_p95_seconds']:.0f} s"] for w in doc["windows"]])
    fleet = (f" on the fleet {doc['fleet_group']} (up to {doc['max_instances']} instances, "
             f"{doc['jobs_per_instance']} jobs each)") if doc["fleet_group"] else ""
    out.note(f"{doc['jobs']} jobs replayed{fleet}, boot {doc['boot_seconds']:.0f} s "
             f"({doc['boots_measured']} measured).")
    if best is not None:
        out.note(f"Recommended (*): an idle window of {best / 60:g} min — the cheapest with a p95 extra wait of at "
                 f"most {max_p95_wait:.0f} s (or the shortest wait if none is): gpuctl deploy --idle-minutes "
                 f"{max(5, round(best / 60))}")
