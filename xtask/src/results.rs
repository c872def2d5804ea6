//! `cargo xtask results <RUN>`: the README's results section, written from a run's report.
//!
//! The section between [`START`] and [`END`] in `README.md` is replaced by the run's machine,
//! date, command, commit and stage times (from `report.json`), its results table and its
//! comparison with the teacher (copied from `report.md`, which the experiment renders), and
//! links to its charts when they are committed. Everything outside the markers is kept as is.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// The line that opens the generated section.
pub const START: &str = "<!-- results:start -->";
/// The line that closes it.
pub const END: &str = "<!-- results:end -->";

/// Rewrites the results section of `readme` from the run in `run`.
pub fn rewrite_readme(readme: &Path, run: &Path, root: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let section = section(run, root)?;
    let new = replace_section(&text, &section)
        .with_context(|| format!("rewriting the results section of {}", readme.display()))?;
    atomic_file::write(readme, new).with_context(|| format!("writing {}", readme.display()))
}

/// `text` with everything between the [`START`] and [`END`] lines replaced by `body`. The
/// markers count only as lines of their own (a mention inside a sentence is not one).
pub fn replace_section(text: &str, body: &str) -> Result<String> {
    // (start, end) byte offsets of each line, without its line break.
    let mut lines = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\n', '\r']);
        lines.push((at, at + content.len(), content.trim()));
        at += line.len();
    }
    let find = |marker: &str| -> Result<(usize, usize)> {
        let mut found = lines.iter().filter(|l| l.2 == marker);
        let Some(&(start, end, _)) = found.next() else {
            bail!(
                "no `{marker}` line: put `{START}` and `{END}` on lines of their own around the \
                 section to generate"
            );
        };
        if found.next().is_some() {
            bail!("`{marker}` appears on more than one line");
        }
        Ok((start, end))
    };
    let ((_, start), (end, _)) = (find(START)?, find(END)?);
    if end < start {
        bail!("`{END}` comes before `{START}`");
    }
    let mut out = String::with_capacity(text.len() + body.len());
    out.push_str(&text[..start]);
    out.push('\n');
    out.push_str(body.trim_end());
    out.push('\n');
    out.push_str(&text[end..]);
    Ok(out)
}

/// A JSON object's entries in the document's order (`serde_json::Map` sorts its keys, and the
/// order of a report's stages is the order they ran in).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Ordered(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// A run's `report.json`: the document (less its stages), and its stages in the order they
/// ran.
struct Report {
    json: Value,
    stages: Vec<(String, Value)>,
}

impl Report {
    fn parse(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    fn get(&self, key: &str) -> &Value {
        &self.json[key]
    }
}

impl<'de> Deserialize<'de> for Report {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Report;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a report: a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Report, A::Error> {
                let mut json = serde_json::Map::new();
                let mut stages = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "stages" {
                        stages = map.next_value::<Ordered>()?.0;
                    } else {
                        json.insert(key, map.next_value()?);
                    }
                }
                Ok(Report {
                    json: Value::Object(json),
                    stages,
                })
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// The generated section for the run in `run`; `root` is the repository, for plot links.
pub fn section(run: &Path, root: &Path) -> Result<String> {
    let json_path = run.join("report.json");
    let report = Report::parse(
        &std::fs::read_to_string(&json_path)
            .with_context(|| format!("reading {}", json_path.display()))?,
    )
    .with_context(|| format!("parsing {}", json_path.display()))?;
    let md_path = run.join("report.md");
    let markdown = std::fs::read_to_string(&md_path)
        .with_context(|| format!("reading {}", md_path.display()))?;

    let text = |key: &str| report.get(key).as_str().unwrap_or("unknown").to_string();
    let mut out = String::from(
        "<!-- Written by `cargo xtask results <run folder>` from that run's report.json and \
         report.md: edits here are overwritten. -->\n\n",
    );
    let commit = report.get("git_commit").as_str().map_or_else(
        || "unknown".to_string(),
        |c| format!("`{}`", &c[..c.len().min(12)]),
    );
    out.push_str(&format!(
        "Machine: {} ({}, {} threads). Date: {}. Commit: {}.{}\n\n",
        text("device_name"),
        text("device"),
        report
            .get("threads")
            .as_u64()
            .map_or("?".into(), |t| t.to_string()),
        text("started"),
        commit,
        if report.get("quick").as_bool() == Some(true) {
            " Quick mode: small subsets, accuracy not meaningful."
        } else {
            ""
        },
    ));
    let (command, note) = command(&report);
    out.push_str(&format!("```sh\n{command}\n```\n\n{note}"));
    out.push_str(&stage_table(&report));

    out.push_str("\n### Every row\n\n");
    out.push_str(
        &results_table(&markdown)
            .with_context(|| format!("finding the results table in {}", md_path.display()))?,
    );
    out.push_str("\n### Against the teacher\n\n");
    match heading_body(&markdown, "## Against the teacher") {
        Some(body) => out.push_str(&body),
        None => out.push_str("(This run's report predates the comparison with the teacher.)\n"),
    }
    out.push_str("\n### Plots\n\n");
    out.push_str(&plot_links(&markdown, run, root));
    Ok(out)
}

/// `cargo xtask experiment` with the options the run changed from the defaults, and a note
/// on what it cannot say (stages kept by `--resume`, options an old report did not record).
///
/// From report schema 2 on, the experiment records those options itself: the run-wide ones
/// (`options`) and each stage's (`stages.<name>.options`), so nothing here knows a default.
/// A schema 1 report recorded neither: its command names the stages and the seed, and the
/// note says that technique options are not shown.
fn command(report: &Report) -> (String, String) {
    let mut command = String::from("cargo xtask experiment");
    let mut note = String::new();
    let mut push = |options: &[Value]| {
        for option in options.iter().filter_map(Value::as_str) {
            command.push(' ');
            command.push_str(option);
        }
    };
    if report.get("schema_version").as_u64().unwrap_or(1) >= 2 {
        push(report.get("options").as_array().map_or(&[], Vec::as_slice));
        // Stages that share a setting (the distillation temperature, say) repeat its option:
        // each option once.
        let mut seen: Vec<(String, String)> = Vec::new();
        for (_, outcome) in &report.stages {
            let options = outcome["options"].as_array().map_or(&[][..], Vec::as_slice);
            for pair in options.chunks(2) {
                let flag = pair[0].as_str().unwrap_or_default().to_string();
                let value = pair.get(1).and_then(Value::as_str).unwrap_or_default();
                if !seen.iter().any(|(f, _)| *f == flag) {
                    seen.push((flag, value.to_string()));
                }
            }
        }
        let pairs: Vec<Value> = seen
            .into_iter()
            .flat_map(|(f, v)| [Value::String(f), Value::String(v)])
            .collect();
        push(&pairs);
    } else {
        if report.get("quick").as_bool() == Some(true) {
            command.push_str(" --quick");
        }
        let stages: Vec<&str> = report.stages.iter().map(|(n, _)| n.as_str()).collect();
        command.push_str(&format!(" --stages {}", stages.join(",")));
        if let Some(seed) = report.get("seed").as_u64() {
            command.push_str(&format!(" --seed {seed}"));
        }
        note.push_str(
            "This report (schema 1) did not record the technique options, so the command \
             shows only the stages and the seed.\n\n",
        );
    }
    let resumed: Vec<&str> = report
        .stages
        .iter()
        .filter(|(_, o)| o["resumed"] == Value::Bool(true))
        .map(|(name, _)| name.as_str())
        .collect();
    if !resumed.is_empty() {
        command.push_str(" --resume --out <run folder>");
        note.push_str(&format!(
            "Stages {} were kept from an earlier invocation with the same settings (their \
             seconds are that invocation's).\n\n",
            resumed.join(", ")
        ));
    }
    (command, note)
}

fn stage_table(report: &Report) -> String {
    let mut md = String::from("| stage | status | seconds |\n|---|---|---:|\n");
    for (name, outcome) in &report.stages {
        let resumed = if outcome["resumed"] == Value::Bool(true) {
            " (kept)"
        } else {
            ""
        };
        md.push_str(&format!(
            "| {name} | {}{resumed} | {} |\n",
            outcome["status"].as_str().unwrap_or("?"),
            outcome["seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.0}")),
        ));
    }
    md
}

/// The body under `heading` (a whole line) up to the next `## ` heading, trimmed; `None`
/// without the heading.
fn heading_body(markdown: &str, heading: &str) -> Option<String> {
    let mut lines = markdown.lines().skip_while(|l| l.trim_end() != heading);
    lines.next()?;
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with("## ")).collect();
    Some(format!("{}\n", body.join("\n").trim()))
}

/// The table under `## Results`: its first run of lines that start with `|`.
fn results_table(markdown: &str) -> Result<String> {
    let Some(body) = heading_body(markdown, "## Results") else {
        bail!("no `## Results` heading");
    };
    let table: Vec<&str> = body
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    if table.is_empty() {
        bail!("no table under `## Results`");
    }
    Ok(format!("{}\n", table.join("\n")))
}

/// Links to the run's charts that are committed, relative to the repository root; otherwise
/// a sentence saying where they are.
fn plot_links(markdown: &str, run: &Path, root: &Path) -> String {
    let images = heading_body(markdown, "## Plots")
        .map(|body| images(&body))
        .unwrap_or_default();
    if images.is_empty() {
        return "This run's report has no charts.\n".into();
    }
    let relative = std::fs::canonicalize(run)
        .ok()
        .zip(std::fs::canonicalize(root).ok())
        .and_then(|(run, root)| run.strip_prefix(&root).ok().map(Path::to_path_buf));
    let committed: Vec<(String, PathBuf)> = images
        .into_iter()
        .filter_map(|(title, file)| {
            let path = relative.as_ref()?.join(&file);
            is_committed(root, &path).then_some((title, path))
        })
        .collect();
    if committed.is_empty() {
        return "The run's charts are SVG files in its `plots/` folder (not committed).\n".into();
    }
    committed
        .into_iter()
        .map(|(title, path)| format!("- [{title}]({})\n", path.to_string_lossy()))
        .collect()
}

/// The `![title](path)` images of `markdown`, in order.
fn images(markdown: &str) -> Vec<(String, String)> {
    markdown
        .split("![")
        .skip(1)
        .filter_map(|rest| {
            let (title, rest) = rest.split_once("](")?;
            let (path, _) = rest.split_once(')')?;
            Some((title.to_string(), path.to_string()))
        })
        .collect()
}

fn is_committed(root: &Path, path: &Path) -> bool {
    Command::new("git")
        .current_dir(root)
        .args(["ls-files", "--error-unmatch", "--"])
        .arg(path)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = include_str!("../../README.md");

    /// A schema 2 report's JSON text, its stages in the given order: (name, kept by
    /// `--resume`, the stage's options), with the run-wide `options`.
    fn report_text_with(stages: &[(&str, bool, &[&str])], options: &[&str]) -> String {
        let stages: Vec<String> = stages
            .iter()
            .map(|&(name, resumed, options)| {
                format!(
                    r#""{name}": {{"status": "ok", "seconds": 12.4, "error": null, "resumed": {resumed}, "settings": {{}}, "options": {}}}"#,
                    serde_json::json!(options)
                )
            })
            .collect();
        let rest = serde_json::json!({
            "schema_version": 2,
            "started": "2026-11-28T10:00:00Z",
            "device": "cpu",
            "device_name": "Test CPU",
            "threads": 2,
            "quick": options.contains(&"--quick"),
            "seed": 42,
            "git_commit": "0123456789abcdef0123",
            "options": options,
            "rows": [],
        })
        .to_string();
        format!(r#"{{"stages": {{{}}}, {}"#, stages.join(", "), &rest[1..])
    }

    /// A report's JSON text in schema 1, which recorded no options.
    fn report_text(stages: &[(&str, bool)], seed: u64, quick: bool) -> String {
        let stages: Vec<String> = stages
            .iter()
            .map(|&(name, resumed)| {
                format!(
                    r#""{name}": {{"status": "ok", "seconds": 12.4, "error": null, "resumed": {resumed}}}"#
                )
            })
            .collect();
        let rest = serde_json::json!({
            "schema_version": 1,
            "started": "2026-11-28T10:00:00Z",
            "device": "cpu",
            "device_name": "Test CPU",
            "threads": 2,
            "quick": quick,
            "seed": seed,
            "git_commit": "0123456789abcdef0123",
            "rows": [
                {"stage": "quantization", "variant": "static_int8_mse", "calibrator": "mse", "selected": true},
            ],
        })
        .to_string();
        format!(r#"{{"stages": {{{}}}, {}"#, stages.join(", "), &rest[1..])
    }

    fn report(stages: &[(&str, bool)], seed: u64, quick: bool) -> Report {
        Report::parse(&report_text(stages, seed, quick)).unwrap()
    }

    const REPORT_MD: &str = "# Experiment report\n\n- started: x\n\n## Results\n\n\
        | stage | variant |\n|---|---|\n| baseline | teacher_float32 |\n\n\
        ## Against the teacher\n\nEach row against the teacher.\n\n| stage | vs teacher (pp) |\n|---|---:|\n| baseline | +0.00 |\n\n\
        ## Plots\n\n![Every model: accuracy](plots/accuracy_size.svg)\nA caption.\n\n\
        ## Stages\n\n| stage | status |\n";

    #[test]
    fn the_section_is_replaced_and_the_rest_kept() {
        let text = format!("intro\n{START}\nold text\n{END}\noutro\n");
        let new = replace_section(&text, "new\n").unwrap();
        assert_eq!(new, format!("intro\n{START}\nnew\n{END}\noutro\n"));
        // Idempotent.
        assert_eq!(replace_section(&new, "new\n").unwrap(), new);
    }

    #[test]
    fn missing_or_misplaced_markers_are_clear_errors() {
        for (text, expect) in [
            (format!("no markers\n{END}\n"), START),
            (format!("{START}\nno end\n"), END),
            (format!("{END}\n{START}\n"), "comes before"),
            (format!("{START}\n{START}\n{END}\n"), "more than one line"),
            // A mention in a sentence is not a marker.
            (
                format!("see `{START}`\n{END}\n"),
                "no `<!-- results:start -->` line",
            ),
        ] {
            let err = replace_section(&text, "x").unwrap_err().to_string();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
    }

    /// `text` before the line with [`START`], and after the line with [`END`].
    fn outside(text: &str) -> (&str, &str) {
        let before = text.split(&format!("\n{START}\n")).next().unwrap();
        let after = text.split(&format!("\n{END}\n")).nth(1).unwrap();
        (before, after)
    }

    #[test]
    fn the_readme_has_the_markers_once() {
        let new = replace_section(README, "generated\n").unwrap();
        let (before, after) = outside(README);
        assert!(new.starts_with(before) && new.ends_with(after));
        assert!(new.contains(&format!("\n{START}\ngenerated\n{END}\n")));
    }

    #[test]
    fn the_command_is_the_options_the_report_recorded() {
        let stages: [(&str, bool, &[&str]); 3] = [
            ("distillation", false, &["--temperature", "4.0"]),
            ("quantization", false, &["--calibrator", "mse"]),
            // The pipeline shares the distillation's temperature: printed once.
            (
                "pipeline",
                false,
                &["--sparsity", "0.85", "--temperature", "4.0"],
            ),
        ];
        let text = report_text_with(&stages, &["--seed", "7"]);
        let (line, note) = command(&Report::parse(&text).unwrap());
        assert_eq!(
            line,
            "cargo xtask experiment --seed 7 --temperature 4.0 --calibrator mse --sparsity 0.85"
        );
        assert!(note.is_empty(), "{note}");

        let stages: [(&str, bool, &[&str]); 2] = [("baseline", false, &[]), ("pruning", true, &[])];
        let text = report_text_with(&stages, &["--quick", "--stages", "baseline,pruning"]);
        let (line, note) = command(&Report::parse(&text).unwrap());
        assert_eq!(
            line,
            "cargo xtask experiment --quick --stages baseline,pruning --resume --out <run folder>"
        );
        assert!(note.contains("Stages pruning were kept"), "{note}");
    }

    #[test]
    fn a_schema_1_report_gives_its_stages_and_seed_and_says_what_is_missing() {
        let (line, note) = command(&report(&[("baseline", false), ("pruning", true)], 7, true));
        assert_eq!(
            line,
            "cargo xtask experiment --quick --stages baseline,pruning --seed 7 --resume --out \
             <run folder>"
        );
        assert!(
            note.contains("did not record the technique options"),
            "{note}"
        );
        assert!(note.contains("Stages pruning were kept"), "{note}");
    }

    #[test]
    fn a_run_folder_rewrites_a_copy_of_the_readme() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        // Not in alphabetical order: the README keeps the order they ran in.
        let stages: [(&str, bool, &[&str]); 2] = [
            ("quantization", false, &["--calibrator", "mse"]),
            ("baseline", false, &[]),
        ];
        let report = report_text_with(&stages, &["--stages", "quantization,baseline"]);
        std::fs::write(run.join("report.json"), report).unwrap();
        std::fs::write(run.join("report.md"), REPORT_MD).unwrap();
        let readme = dir.path().join("README.md");
        std::fs::write(&readme, README).unwrap();

        rewrite_readme(&readme, &run, dir.path()).unwrap();
        let new = std::fs::read_to_string(&readme).unwrap();
        let (before, after) = outside(&new);
        let inside = &new[before.len()..new.len() - after.len()];
        for text in [
            "Machine: Test CPU (cpu, 2 threads). Date: 2026-11-28T10:00:00Z. Commit: `0123456789ab`.",
            "cargo xtask experiment --stages quantization,baseline --calibrator mse\n",
            "| quantization | ok | 12 |\n| baseline | ok | 12 |",
            "### Every row\n\n| stage | variant |\n|---|---|\n| baseline | teacher_float32 |\n",
            "Each row against the teacher.\n\n| stage | vs teacher (pp) |",
            // Not a git repository: the charts are not committed, so no links.
            "in its `plots/` folder (not committed)",
        ] {
            assert!(inside.contains(text), "missing {text:?} in\n{inside}");
        }
        assert!(!inside.contains("## Stages"), "{inside}");
        assert_eq!(
            (before, after),
            outside(README),
            "text outside the markers changed"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary left"
        );
    }

    #[test]
    fn a_report_without_a_results_table_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("report.json"), "{}").unwrap();
        std::fs::write(dir.path().join("report.md"), "# Experiment report\n").unwrap();
        let err = format!("{:#}", section(dir.path(), dir.path()).unwrap_err());
        assert!(err.contains("## Results"), "{err}");
        assert!(section(&dir.path().join("missing"), dir.path()).is_err());
    }

    #[test]
    fn images_are_found_in_order() {
        assert_eq!(
            images("![A](plots/a.svg)\ntext ![B c](plots/b.svg) more"),
            [
                ("A".to_string(), "plots/a.svg".to_string()),
                ("B c".to_string(), "plots/b.svg".to_string())
            ]
        );
    }
}
