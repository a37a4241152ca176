//! The documentation lguest carries about itself: shell completions and man pages, generated
//! from the same clap definition that parses the command line ([`crate::config::Cli`]), so
//! they can't drift from it. `scripts/install.sh` writes them where shells and `man` look.

use std::io::{self, Write};

use clap::CommandFactory;

use crate::config::Cli;

/// Why a man page couldn't be printed.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("lguest has no command '{0}'; see 'lguest --help'")]
    NoSuchCommand(String),
    #[error("cannot write to stdout: {0}")]
    Write(#[from] io::Error),
}

/// Writes `shell`'s completion script for `lguest` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "lguest", out);
}

/// Writes the man page of `lguest` (no `command`) or of `lguest COMMAND` (named `lguest-COMMAND`,
/// as git's are) to `out`.
pub fn man_page(command: Option<&str>, out: &mut dyn Write) -> Result<(), DocsError> {
    let lguest = Cli::command();
    let page = match command {
        None => lguest,
        Some(name) => {
            let sub = lguest.find_subcommand(name).ok_or_else(|| DocsError::NoSuchCommand(name.to_string()))?.clone();
            sub.display_name(format!("lguest-{name}")).bin_name(format!("lguest {name}")).version(env!("CARGO_PKG_VERSION"))
        }
    };
    clap_mangen::Man::new(page).render(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_every_flag_of_run() {
        let mut bash = Vec::new();
        completions(clap_complete::Shell::Bash, &mut bash);
        let bash = String::from_utf8_lossy(&bash);
        for flag in ["--kernel", "--disk", "--net", "--console", "--seccomp", "--reboot"] {
            assert!(bash.contains(flag), "{flag} missing from the bash completions");
        }
        assert!(bash.contains("serial virtio"), "the console's values are completed");
    }

    #[test]
    fn man_pages_for_lguest_and_run() {
        let mut top = Vec::new();
        man_page(None, &mut top).expect("lguest.1");
        assert!(String::from_utf8_lossy(&top).contains(".TH lguest 1"));
        let mut run = Vec::new();
        man_page(Some("run"), &mut run).expect("lguest-run.1");
        let run = String::from_utf8_lossy(&run);
        assert!(run.contains(".TH lguest-run 1") && run.contains("lguest run") && run.contains("\\-\\-kernel"), "{run}");
        assert!(matches!(man_page(Some("fly"), &mut Vec::new()), Err(DocsError::NoSuchCommand(_))));
    }
}
