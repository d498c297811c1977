//! `manifests`: inspect, verify, merge, trace and judge the manifests that connect parti's stages.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use manifests::diff::diff;
use manifests::lineage::lineage;
use manifests::manifest::is_part_manifest;
use manifests::merge::merge;
use manifests::status::status;
use manifests::{Location, Manifest, manifest_location};

#[derive(Parser)]
#[command(
    version,
    about,
    long_about = "Inspect, verify, merge and trace parti stage manifests.\n\n\
Every URI may be a local path, file://, s3://, gs://, az:// or memory://; a folder means its \
manifest.json. Bucket credentials and endpoints come from the environment (AWS_*, GOOGLE_*, \
AZURE_*)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a manifest (pretty JSON) after checking its schema.
    Show { uri: String },
    /// Check every artifact's size and digest; exit 1 naming each bad artifact.
    Verify {
        uri: String,
        /// Check sizes only (no download of artifact contents).
        #[arg(long)]
        sizes_only: bool,
    },
    /// Merge the partial manifests of a batch array's jobs into OUT.
    Merge {
        /// Where to write the merged manifest (a folder means OUT/manifest.json).
        out: String,
        /// The jobs' manifests (manifest.part-*.json), or one folder holding them.
        #[arg(required = true)]
        parts: Vec<String>,
    },
    /// Print the chain of upstream stages with their digests, flagging changed links.
    Lineage { uri: String },
    /// For every stage manifest under RUN: up to date, or stale and why (an artifact, a source
    /// file or an upstream stage changed), without running anything. Exit 0 when all are up to
    /// date, 1 otherwise. A stage's own settings are the next command's; this checks the rest.
    Status {
        #[arg(value_name = "RUN")]
        run: String,
    },
    /// Compare two runs stage by stage (manifests matched by their path below each run): the
    /// configs, raw data, artifacts and metrics (timings left out). Exit 0 when every stage is
    /// the same in both, 1 otherwise: the check that an upgrade or a refactor changed no result.
    Diff {
        #[arg(value_name = "RUN")]
        first: String,
        #[arg(value_name = "OTHER_RUN")]
        second: String,
        /// Differences listed per stage at most (the count of the rest is given).
        #[arg(long, default_value_t = 10)]
        show: usize,
    },
}

fn main() -> ExitCode {
    manifests::cli::init_logging();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Show { uri } => {
            let location = manifest_location(&uri)?;
            let (manifest, _) = Manifest::read(&location)?;
            print!("{}", String::from_utf8_lossy(&manifest.to_bytes()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { uri, sizes_only } => {
            let location = manifest_location(&uri)?;
            let (manifest, _) = Manifest::read(&location)?;
            let problems = manifest.verify(&location, !sizes_only);
            for problem in &problems {
                println!("BAD {problem}");
            }
            if problems.is_empty() {
                println!(
                    "ok: {} artifacts of {} verified ({})",
                    manifest.artifacts.len(),
                    location,
                    if sizes_only { "sizes" } else { "digests" }
                );
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(1))
            }
        }
        Command::Merge { out, parts } => {
            let out = manifest_location(&out)?;
            let mut part_locations = Vec::new();
            for uri in &parts {
                if uri.ends_with(".json") {
                    part_locations.push(Location::parse(uri)?);
                } else {
                    let listed = Location::parse(uri)?.list()?;
                    part_locations.extend(
                        listed
                            .into_iter()
                            .map(|o| o.location)
                            .filter(|l| is_part_manifest(l.file_name())),
                    );
                }
            }
            let mut loaded = Vec::new();
            for location in part_locations {
                let (manifest, _) = Manifest::read(&location)
                    .with_context(|| format!("reading partial manifest {location}"))?;
                loaded.push((location, manifest));
            }
            let merged = merge(&out, &loaded)?;
            let problems = merged.verify(&out, false);
            if let Some(problem) = problems.first() {
                anyhow::bail!("merged manifest would list a bad artifact: {problem}");
            }
            merged.write(&out)?;
            println!(
                "merged {} job manifests into {out}: {} artifacts",
                loaded.len(),
                merged.artifacts.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { run } => {
            let run = Location::parse(&run)?;
            let statuses = status(&run).with_context(|| format!("status of {run}"))?;
            if statuses.is_empty() {
                anyhow::bail!("{run}: no stage manifests below it");
            }
            let width = statuses.iter().map(|s| s.stage.len()).max().unwrap_or(0);
            for stage in &statuses {
                let folder = stage.location.parent();
                let place = folder.relative_to(&run).unwrap_or_else(|| folder.uri());
                match &stage.stale {
                    None => println!("up to date  {:width$}  {place}", stage.stage),
                    Some(why) => println!("stale       {:width$}  {place}: {why}", stage.stage),
                }
            }
            let stale = statuses.iter().filter(|s| s.stale.is_some()).count();
            println!("{} up to date, {stale} stale", statuses.len() - stale);
            Ok(if stale == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Diff {
            first,
            second,
            show,
        } => {
            let (first, second) = (Location::parse(&first)?, Location::parse(&second)?);
            let found = diff(&first, &second)
                .with_context(|| format!("comparing {first} with {second}"))?;
            let width = found
                .stages
                .iter()
                .map(|s| s.stage.len())
                .max()
                .unwrap_or(0);
            for stage in &found.stages {
                let verdict = if stage.differences.is_empty() {
                    "same   "
                } else {
                    "differs"
                };
                println!("{verdict}  {:width$}  {}", stage.stage, stage.manifest);
                for difference in stage.differences.iter().take(show) {
                    println!("           {difference}");
                }
                if stage.differences.len() > show {
                    println!("           and {} more", stage.differences.len() - show);
                }
            }
            for (path, run) in found
                .only_in_first
                .iter()
                .map(|path| (path, &first))
                .chain(found.only_in_second.iter().map(|path| (path, &second)))
            {
                println!("only in {run}: {path}");
            }
            let differing = found
                .stages
                .iter()
                .filter(|s| !s.differences.is_empty())
                .count();
            println!(
                "{} stages in both: {} the same, {differing} differ; {} only in the first, {} only in the second",
                found.stages.len(),
                found.stages.len() - differing,
                found.only_in_first.len(),
                found.only_in_second.len()
            );
            Ok(if found.is_same() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Lineage { uri } => {
            let entries = lineage(&uri)?;
            let mut broken = false;
            for entry in entries {
                broken |= entry.status == "changed" || entry.status == "missing";
                println!(
                    "{}{} [{}] {} {} {}",
                    "  ".repeat(entry.depth),
                    entry.name,
                    entry.stage.as_deref().unwrap_or("source"),
                    entry.uri,
                    entry.digest,
                    entry.status
                );
            }
            Ok(if broken {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
