//! Shell completions and man pages generated from a binary's clap command, for the hidden
//! `completions <shell>` and `man --out DIR` verbs of both binaries (packagers run them at build
//! time; nothing is written by hand, so the pages never drift from the flags).

use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn std::io::Write) {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Writes one man page per command and visible subcommand into `dir` (created if missing):
/// `NAME.1`, `NAME-VERB.1`, `NAME-VERB-SUB.1`. Returns the files written.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    write_page(&cmd, cmd.get_name().to_owned(), dir, &mut written)?;
    Ok(written)
}

fn write_page(cmd: &clap::Command, name: String, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    // clap names are `&'static str` (no `string` feature); a few small strings per run.
    let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
    let page = cmd.clone().name(static_name);
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    std::fs::write(&path, buf)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_page(sub, format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

/// Every argument of `cmd` and its subcommands (hidden ones too) that has no help text, as
/// `command path: --flag` (for the binaries' tests: every flag and positional is explained).
pub fn args_without_help(cmd: &clap::Command) -> Vec<String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, cmd.get_name().to_owned(), &mut missing);
    missing
}

fn walk(cmd: &clap::Command, path: String, missing: &mut Vec<String>) {
    if cmd.get_about().is_none() && path.contains(' ') {
        missing.push(format!("{path}: (the command itself)"));
    }
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        if a.get_help().is_none() && a.get_long_help().is_none() {
            missing.push(format!(
                "{path}: {}",
                a.get_long().map(|l| format!("--{l}")).unwrap_or_else(|| id.to_uppercase())
            ));
        }
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        walk(sub, format!("{path} {}", sub.get_name()), missing);
    }
}
