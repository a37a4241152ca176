//! Which kernel modules the `lguest exec` guest needs, and in what order to load them.
//!
//! The guest's devices need drivers: virtio_pci, virtiofs (and fuse), overlay, the vsock
//! transport, and virtio_net with `--net`. A distro kernel builds them as modules, so lguest
//! reads the modules directory's `modules.dep` (what `depmod` wrote: `path.ko: dep.ko ...`),
//! puts each wanted module after its dependencies, and skips what `modules.builtin` says is
//! built in. A kernel with every driver built in needs no directory at all.
//!
//! `modules.dep` comes from a directory the user named: it is parsed as hostile (a line too
//! long, a cycle, a path leaving the directory are errors or ignored, never a hang or a
//! panic).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// What every `lguest exec` guest loads.
pub const BASE_MODULES: [&str; 4] = ["virtio_pci", "virtiofs", "overlay", "vmw_vsock_virtio_transport"];
/// What `--net` adds.
pub const NET_MODULES: [&str; 1] = ["virtio_net"];
/// The largest modules.dep we read (Debian's is ~400 KiB).
pub const MAX_DEP_FILE: u64 = 16 << 20;
/// The longest chain of dependencies we follow (real ones are under ten deep).
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModulesError {
    #[error("cannot read '{path}': {why}; give --modules the kernel's lib/modules/VERSION directory (with its modules.dep)")]
    Read { path: String, why: String },
    #[error("the kernel module '{name}' is neither in {dir}/modules.dep nor built in; give --modules the directory of this kernel's modules")]
    Missing { name: String, dir: String },
    #[error("{dir}/modules.dep has a dependency cycle, or a chain over {MAX_DEPTH} deep, through '{name}'")]
    Cycle { name: String, dir: String },
}

/// A module's file name without `.ko[.xz|.zst|.gz]`, with `-` as `_` (as the kernel names it).
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file.strip_suffix(ext))?;
    (!stem.is_empty()).then(|| stem.replace('-', "_"))
}

/// modules.dep and modules.builtin, parsed.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// Module name → its file (relative to the directory) and its dependencies' names.
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Reads `dir`'s modules.dep and (if present) modules.builtin.
    pub fn read(dir: &Path) -> Result<ModuleIndex, ModulesError> {
        let dep = read_bounded(&dir.join("modules.dep"))?;
        let builtin = read_bounded(&dir.join("modules.builtin")).unwrap_or_default();
        Ok(ModuleIndex::parse(dir, &dep, &builtin))
    }

    /// Lines that are not `path.ko: dep.ko ...` with relative paths are skipped.
    pub fn parse(dir: &Path, dep: &str, builtin: &str) -> ModuleIndex {
        let mut modules = HashMap::new();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else { continue };
            let (Some(name), true) = (module_name(path), stays_inside(path)) else { continue };
            let deps = deps.split_whitespace().filter_map(module_name).collect();
            modules.entry(name).or_insert((path.to_string(), deps));
        }
        let builtin = builtin.lines().filter_map(module_name).collect();
        ModuleIndex { dir: dir.to_path_buf(), modules, builtin }
    }

    /// The files to load for `wanted`, each after its dependencies, each once.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<PathBuf>, ModulesError> {
        let mut order = Vec::new();
        let (mut done, mut visiting) = (HashSet::new(), HashSet::new());
        for name in wanted {
            self.visit(&name.replace('-', "_"), &mut done, &mut visiting, &mut order)?;
        }
        Ok(order)
    }

    fn visit(&self, name: &str, done: &mut HashSet<String>, visiting: &mut HashSet<String>, order: &mut Vec<PathBuf>) -> Result<(), ModulesError> {
        if done.contains(name) {
            return Ok(());
        }
        let dir = self.dir.display().to_string();
        let Some((path, deps)) = self.modules.get(name) else {
            return match self.builtin.contains(name) {
                true => Ok(()),
                false => Err(ModulesError::Missing { name: name.to_string(), dir }),
            };
        };
        if visiting.len() >= MAX_DEPTH || !visiting.insert(name.to_string()) {
            return Err(ModulesError::Cycle { name: name.to_string(), dir });
        }
        for dep in deps {
            self.visit(dep, done, visiting, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(self.dir.join(path));
        Ok(())
    }
}

/// A relative path with no `..`: a modules.dep can't make us read outside its directory.
fn stays_inside(path: &str) -> bool {
    !path.starts_with('/') && !path.split('/').any(|part| part == "..")
}

fn read_bounded(path: &Path) -> Result<String, ModulesError> {
    use std::io::Read;
    let error = |why: String| ModulesError::Read { path: path.display().to_string(), why };
    let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    let mut text = String::new();
    file.take(MAX_DEP_FILE).read_to_string(&mut text).map_err(|e| error(e.to_string()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/overlayfs/overlay.ko.xz:
";

    fn names(paths: &[PathBuf]) -> Vec<String> {
        paths.iter().filter_map(|p| module_name(&p.to_string_lossy())).collect()
    }

    #[test]
    fn names_drop_the_extension_and_use_underscores() {
        assert_eq!(module_name("kernel/net/a-b.ko.zst").as_deref(), Some("a_b"));
        assert_eq!(module_name("kernel/x.ko").as_deref(), Some("x"));
        assert_eq!(module_name("kernel/x.o"), None);
        assert_eq!(module_name(".ko"), None);
    }

    #[test]
    fn each_module_comes_after_its_dependencies_once() {
        let index = ModuleIndex::parse(Path::new("/m"), DEP, "kernel/net/vmw_vsock/vsock.ko\n");
        let order = index.resolve(&["virtio_pci", "virtiofs", "overlay", "vsock"]).expect("resolves");
        assert_eq!(names(&order), ["virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci", "fuse", "virtiofs", "overlay"]);
        assert_eq!(order[1], Path::new("/m/kernel/drivers/virtio/virtio_ring.ko"));
    }

    #[test]
    fn a_module_neither_listed_nor_built_in_is_named_in_the_error() {
        let index = ModuleIndex::parse(Path::new("/m"), DEP, "");
        assert_eq!(index.resolve(&["virtio_net"]), Err(ModulesError::Missing { name: "virtio_net".into(), dir: "/m".into() }));
    }

    #[test]
    fn hostile_dep_files_give_errors_or_are_ignored() {
        let cycle = "a.ko: b.ko\nb.ko: a.ko\n";
        assert!(matches!(ModuleIndex::parse(Path::new("/m"), cycle, "").resolve(&["a"]), Err(ModulesError::Cycle { .. })));
        let escapes = "../../etc/evil.ko:\n/abs/evil2.ko:\nno colon here\n:\n\0\u{fffd}.ko: x\n";
        let index = ModuleIndex::parse(Path::new("/m"), escapes, "");
        assert!(index.resolve(&["evil"]).is_err() && index.resolve(&["evil2"]).is_err(), "paths leaving the directory are ignored");
        let self_dep = "a.ko: a.ko\n";
        assert!(ModuleIndex::parse(Path::new("/m"), self_dep, "").resolve(&["a"]).is_err());
        let chain = |n: usize| -> String { (0..n).map(|i| format!("m{i}.ko: m{}.ko\n", i + 1)).collect() };
        let built_in = |n: usize| format!("m{n}.ko\n");
        assert_eq!(ModuleIndex::parse(Path::new("/m"), &chain(50), &built_in(50)).resolve(&["m0"]).map(|o| o.len()), Ok(50));
        let deep = ModuleIndex::parse(Path::new("/m"), &chain(100_000), &built_in(100_000)).resolve(&["m0"]);
        assert!(matches!(deep, Err(ModulesError::Cycle { .. })), "a chain too deep is an error, not a stack overflow");
    }

    #[test]
    fn a_missing_directory_says_what_to_give() {
        let error = ModuleIndex::read(Path::new("/no/such/dir")).expect_err("no dir");
        assert!(error.to_string().contains("--modules"), "{error}");
    }
}
