//! `peerwire bench run`: finds the responders, measures every style at every size in
//! one run (the raw TCP baseline first at each size), and reports.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use peerwire::Node;

use super::measure::{self, Info, Latency, Schedule, Throughput};
use super::{report, tcp, Plan, Style};
use crate::cli::NodeArgs;

/// Runs the plan and prints (or writes) what it measured.
pub(super) async fn run(args: &NodeArgs, plan: &Plan) -> Result<()> {
    // TCP both ways, as between two machines (and as the raw baseline): same-host ipc
    // would carry the responders' gather replies back (`cargo bench --bench node` with
    // BENCH_ONLY=ipc measures that path).
    let node = args.client_node_with(|b| b.ipc(false)).await?;
    let result = measure_all(&node, args, plan).await;
    node.shutdown().await;
    let (latency, throughput) = result?;
    if let Some(path) = &plan.svg {
        report::svg(path, &latency)?;
        errln!("wrote {}", path.display());
    }
    if plan.json {
        outln!("{}", report::json(plan, &latency, &throughput));
    } else {
        report::table(plan, &latency, &throughput);
    }
    Ok(())
}

async fn measure_all(
    node: &Node,
    args: &NodeArgs,
    plan: &Plan,
) -> Result<(Vec<Latency>, Vec<Throughput>)> {
    let wait = args.wait().max(Duration::from_secs(1));
    if !node
        .wait_for_service("bench.echo", plan.responders, wait)
        .await
    {
        args.report_unreachable(node);
        let found = node
            .peers()
            .iter()
            .filter(|p| p.methods.contains_key("bench.echo"))
            .count();
        bail!(
            "{found} of {} bench responder(s) found within {} ms: start `peerwire bench \
             serve` and give its endpoint with --peer",
            plan.responders,
            wait.as_millis()
        );
    }
    // Gathers (the gather series, and counting throughput) need each responder's SUB
    // on our PUB: it connects once its HELLO is answered, a moment after.
    let deadline = tokio::time::Instant::now() + wait;
    for topic in ["bench.gather", "bench.report", "bench.reset"] {
        while node.subscribers_of(topic).len() < plan.responders {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} of {} bench responder(s) subscribed to this node's events within {} \
                     ms (a responder on another host dials this node back: give --listen an \
                     address it can reach, this node listens on {})",
                    node.subscribers_of(topic).len(),
                    plan.responders,
                    wait.as_millis(),
                    node.endpoint()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let tcp_addr = if plan.styles.contains(&Style::Tcp) {
        Some(echo_address(node, plan).await?)
    } else {
        None
    };
    let schedule = plan.rate.map_or(Schedule::BackToBack, Schedule::Rate);
    let (mut latency, mut throughput) = (Vec::new(), Vec::new());
    for &size in &plan.sizes {
        for &style in &plan.styles {
            if !plan.json {
                errln!("measuring {} at {size} B…", style.name());
            }
            match style {
                Style::Tcp => {
                    let addr = tcp_addr.expect("resolved above");
                    latency.push(
                        tcp::pingpong(
                            addr,
                            size,
                            plan.warmup_for(size),
                            plan.count_for(size),
                            schedule,
                            plan.timeout(),
                        )
                        .await?,
                    );
                }
                Style::Request => latency.push(measure::request(node, size, plan).await?),
                Style::Gather => {
                    latency.push(measure::gather(node, size, plan, plan.responders).await?)
                }
                Style::Notify => {
                    throughput.extend(measure::notify(node, size, plan, plan.responders).await?)
                }
                Style::Pubsub => {
                    throughput.extend(measure::pubsub(node, size, plan, plan.responders).await?)
                }
            }
        }
    }
    Ok((latency, throughput))
}

/// Where the responder's raw TCP echo listens: its port (`bench.info`) at the address
/// its node is reached at.
async fn echo_address(node: &Node, plan: &Plan) -> Result<SocketAddr> {
    let info: Info = node
        .request_with(
            "bench.info",
            &(),
            peerwire::CallOptions::timeout(plan.timeout()),
        )
        .await
        .map_err(|e| anyhow!("asking the responder for its raw TCP port: {e}"))?;
    let peer = node
        .peers()
        .into_iter()
        .find(|p| p.id == info.id)
        .ok_or_else(|| anyhow!("the responder that answered bench.info is gone"))?;
    let ip = peer
        .router_endpoint
        .socket_addr()
        .map(|a| a.ip())
        .ok_or_else(|| {
            anyhow!(
                "the responder's endpoint {} has no address",
                peer.router_endpoint
            )
        })?;
    Ok(SocketAddr::new(ip, info.tcp_port))
}
