//! `chain-sim`: the chain simulator (issue 13) from the command line. Runs the real decider under
//! each policy against the same simulated demand and prints one row per policy and one for the
//! omniscient allocator.
//!
//! ```text
//! cargo run -p shelfsync-tests --release --bin chain-sim -- --stores 20 --dark 0.1 --skus 200 --days 2 --seed 7
//! ```

use std::process::ExitCode;
use std::str::FromStr;

use shelfsync_tests::chainsim::{channel_table, run_all_world, sum, table, Policy, SimConfig, World};

const USAGE: &str = "\
usage: chain-sim [--stores N] [--skus N] [--days N] [--dark SHARE] [--seed N] [--seeds N]
                 [--policy all|off|staleness|escrow|escrow+staleness]
                 [--share SHARE] [--keep N] [--max N|none] [--overdraft P]
                 [--flash-skus N] [--flash-factor X] [--flash-at MINUTE]
                 [--walkins N] [--online RATIO] [--dark-mean MINUTES]
                 [--par-min N] [--par-max N] [--restock-every DAYS]
                 [--pick-min MINUTES] [--pick-max MINUTES]
                 [--market RATIO] [--market-refresh MINUTES] [--market-buffer N]
                 [--market-protect yes|no]

  --stores         stores in the chain (20)
  --skus           SKUs, every store carries all (200)
  --days           simulated days (2)
  --dark           long-run share of stores dark at any time, 0 <= x < 1 (0.1)
  --seed           seed of everything (7)
  --seeds          run seeds seed, seed+1, ... (this many) and add the runs up (1)
  --policy         which policies to run, or all (all)
  --share          escrow: share of on-hand granted online (0.3)
  --keep           escrow: units a store always keeps for walk-ins (1)
  --max            escrow: most unreserved units online per store and SKU (none)
  --overdraft      escrow: probability a store sells beyond its rights at the till (0)
  --flash-skus     hot SKUs in the flash sale, at most --skus (3)
  --flash-factor   online demand of flash SKUs in the flash hour, x usual (20)
  --flash-at       first minute of the flash hour (default: 19:00 on the last day)
  --walkins        walk-in units per average store and day (300)
  --online         online units per walk-in unit (0.25)
  --dark-mean      mean dark spell in minutes (90)
  --par-min        smallest par level (4)
  --par-max        largest par level (30)
  --restock-every  days between two restocks of a store (2)
  --pick-min       shortest delay before a store picks a hold, minutes (30)
  --pick-max       longest such delay (120)
  --market         marketplace orders per web order, 0 = no marketplace (0)
  --market-refresh minutes between two refreshes of the marketplace's listing (10)
  --market-buffer  units of each SKU the marketplace channel may not list (1)
  --market-protect yes: the channel is lagged by the refresh, with the buffer; no: it lists
                   everything its stores have (yes)
";

const FLAGS: [&str; 26] = [
    "--seeds",
    "--stores",
    "--skus",
    "--days",
    "--dark",
    "--seed",
    "--policy",
    "--share",
    "--keep",
    "--max",
    "--overdraft",
    "--flash-skus",
    "--flash-factor",
    "--flash-at",
    "--walkins",
    "--online",
    "--dark-mean",
    "--par-min",
    "--par-max",
    "--restock-every",
    "--pick-min",
    "--pick-max",
    "--market",
    "--market-refresh",
    "--market-buffer",
    "--market-protect",
];

fn value<T: FromStr>(flag: &str, v: &str, what: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{flag}: expected {what}, got '{v}'"))
}

/// Most seeds one command runs.
const SEEDS_MAX: u64 = 1000;

fn parse(args: &[String]) -> Result<Option<(SimConfig, Vec<Policy>, u64)>, String> {
    let mut cfg = SimConfig::default();
    let mut seeds = 1;
    let mut policies = Policy::ALL.to_vec();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if !flag.starts_with("--") {
            return Err(format!("unexpected argument '{arg}'"));
        }
        if !FLAGS.contains(&flag.as_str()) {
            return Err(format!("unknown flag {flag}"));
        }
        let v = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i).cloned().ok_or_else(|| format!("{flag}: missing value"))?
            }
        };
        let f = flag.as_str();
        match f {
            "--stores" => cfg.stores = value(f, &v, "a whole number")?,
            "--skus" => cfg.skus = value(f, &v, "a whole number")?,
            "--days" => cfg.days = value(f, &v, "a whole number")?,
            "--dark" => cfg.dark = value(f, &v, "a number between 0 and 1")?,
            "--seed" => cfg.seed = value(f, &v, "a whole number")?,
            "--seeds" => {
                seeds = value(f, &v, "a whole number")?;
                if seeds == 0 || seeds > SEEDS_MAX {
                    return Err(format!("--seeds: expected 1 to {SEEDS_MAX}, got {seeds}"));
                }
            }
            "--policy" => {
                policies = if v == "all" {
                    Policy::ALL.to_vec()
                } else {
                    let mut ps = Vec::new();
                    for name in v.split(',') {
                        let p = Policy::parse(name).ok_or_else(|| {
                            format!("--policy: expected all, off, staleness, escrow or escrow+staleness, got '{name}'")
                        })?;
                        ps.push(p);
                    }
                    ps
                }
            }
            "--share" => cfg.share = value(f, &v, "a number between 0 and 1")?,
            "--keep" => cfg.keep = value(f, &v, "a whole number")?,
            "--max" => cfg.max = if v == "none" { None } else { Some(value(f, &v, "a whole number or none")?) },
            "--overdraft" => cfg.overdraft = value(f, &v, "a probability between 0 and 1")?,
            "--flash-skus" => cfg.flash_skus = value(f, &v, "a whole number")?,
            "--flash-factor" => cfg.flash_factor = value(f, &v, "a number")?,
            "--flash-at" => cfg.flash_start_min = Some(value(f, &v, "a minute (whole number)")?),
            "--walkins" => cfg.walkins_per_store_day = value(f, &v, "a number")?,
            "--online" => cfg.online_per_walkin = value(f, &v, "a number")?,
            "--dark-mean" => cfg.dark_mean_min = value(f, &v, "a number of minutes")?,
            "--par-min" => cfg.par_min = value(f, &v, "a whole number")?,
            "--par-max" => cfg.par_max = value(f, &v, "a whole number")?,
            "--restock-every" => cfg.restock_every_days = value(f, &v, "a whole number of days")?,
            "--pick-min" => cfg.pick_delay_min = value(f, &v, "a whole number of minutes")?,
            "--pick-max" => cfg.pick_delay_max = value(f, &v, "a whole number of minutes")?,
            "--market" => cfg.market = value(f, &v, "a number")?,
            "--market-refresh" => cfg.market_refresh_min = value(f, &v, "a whole number of minutes")?,
            "--market-buffer" => cfg.market_buffer = value(f, &v, "a whole number")?,
            "--market-protect" => {
                cfg.market_protect = match v.as_str() {
                    "yes" => true,
                    "no" => false,
                    other => return Err(format!("--market-protect: expected yes or no, got '{other}'")),
                }
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
        i += 1;
    }
    cfg.validate()?;
    Ok(Some((cfg, policies, seeds)))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cfg, policies, seeds) = match parse(&args) {
        Ok(Some(p)) => p,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("chain-sim: {e}\n(chain-sim --help lists the flags)");
            return ExitCode::from(2);
        }
    };
    let world = World::new(&cfg);
    let (flash, at) = world.flash();
    let flash: Vec<String> = flash.iter().map(ToString::to_string).collect();
    println!(
        "chain-sim: {} stores, {} SKUs, {} days, dark {}, seed {}; escrow share {} keep {} max {}, overdraft {}",
        cfg.stores,
        cfg.skus,
        cfg.days,
        cfg.dark,
        cfg.seed,
        cfg.share,
        cfg.keep,
        cfg.max.map_or("none".to_owned(), |m| m.to_string()),
        cfg.overdraft
    );
    println!(
        "demand: {} online orders, {} walk-ins, {} units at the start; flash x{} on [{}] from day {} {:02}:{:02}",
        world.online_orders(),
        world.walkins(),
        world.initial_units(),
        cfg.flash_factor,
        flash.join(", "),
        at / 1440 + 1,
        at % 1440 / 60,
        at % 60
    );
    let mut runs = vec![run_all_world(&world, &policies)];
    for s in 1..seeds {
        runs.push(run_all_world(&World::new(&SimConfig { seed: cfg.seed + s, ..cfg.clone() }), &policies));
    }
    if seeds > 1 {
        println!("added up over seeds {} to {}", cfg.seed, cfg.seed + seeds - 1);
    }
    let (reports, omni) = sum(runs);
    println!();
    print!("{}", table(&reports, &omni));
    println!();
    println!(
        "\
broken    accepted orders later cut short (at dark: at a store that was dark when the order came)
per 10k   broken per 10 000 accepted orders; served = promised - broken
of omni   served / what the omniscient allocator served ({})
walk-ins  walk-ins sold a unit; lost: turned away
oversell, overdraft, neg: conflicts opened (resourced: oversells settled by moving the promise)
od units  units sold at a till beyond the store's own rights
wait      order to its last pick, fulfilled orders; open: orders still waiting at the end
truth     after a final sync: hub on_hand = store ledger = true units, every (store, SKU)",
        omni.served
    );
    if cfg.market > 0.0 {
        println!(
            "\nchannels: a marketplace refreshing its listing every {} min, {}",
            cfg.market_refresh_min,
            if cfg.market_protect {
                format!("lagged by that with a buffer of {}", cfg.market_buffer)
            } else {
                "listing everything its stores have (no buffer, no lag margin)".to_owned()
            }
        );
        print!("{}", channel_table(&reports, &omni));
        println!(
            "sold      marketplace orders it listed (and so promised); broken: some units never supplied
ch oversell  channel_oversell conflicts (marketplace orders beyond the stores' stock when they came)"
        );
    }
    let mut failed = false;
    for r in &reports {
        if let Err(e) = &r.truth {
            eprintln!("chain-sim: {}: ground truth check failed: {e}", r.policy.name());
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
