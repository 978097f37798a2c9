//! The container engine that builds and runs the images: Docker (with buildx) or Podman.
//!
//! On a developer's machine the engine's own configuration is used. The tests use a
//! private Podman instead ([`Engine::private_podman`]): its own storage in a temp dir,
//! with the settings that work on machines without systemd (vfs storage, runc,
//! cgroupfs, no default rlimits), so that nothing touches the machine's images.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::install::on_path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Docker,
    Podman,
}

impl Kind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "docker" => Ok(Self::Docker),
            "podman" => Ok(Self::Podman),
            other => bail!("unknown engine {other:?}: docker or podman"),
        }
    }

    fn program(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Engine {
    kind: Kind,
    global_args: Vec<OsString>,
    env: Vec<(&'static str, OsString)>,
}

/// One image build: the Dockerfile, the tags, `--build-arg`s and named build contexts.
pub struct Build<'a> {
    pub dockerfile: &'a Path,
    pub context: &'a Path,
    pub tags: &'a [String],
    pub args: &'a [(&'a str, String)],
    pub named_contexts: &'a [(&'a str, &'a Path)],
}

impl Engine {
    /// `preferred`, or Docker when its daemon answers and buildx is there, else Podman.
    pub fn detect(preferred: Option<Kind>) -> Result<Self> {
        let docker_works = || {
            on_path("docker")
                && succeeds(Command::new("docker").args(["buildx", "version"]))
                && succeeds(Command::new("docker").args(["info", "--format", "{{.ID}}"]))
        };
        let kind = match preferred {
            Some(kind) => kind,
            None if docker_works() => Kind::Docker,
            None if on_path("podman") => Kind::Podman,
            None => bail!(
                "no container engine: install Docker with buildx, or Podman (Debian: apt-get install podman buildah runc)"
            ),
        };
        if !on_path(kind.program()) {
            bail!("{} is not installed", kind.program());
        }
        Ok(Self {
            kind,
            global_args: Vec::new(),
            env: Vec::new(),
        })
    }

    /// A Podman of our own with its storage under `dir` (see the module's comment).
    pub fn private_podman(dir: &Path) -> Result<Self> {
        let conf = dir.join("containers.conf");
        // Locked rlimits here make Podman's default ulimits fail the container start.
        std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n")
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let mut global_args: Vec<OsString> = Vec::new();
        for (flag, value) in [
            ("--root", dir.join("root").into_os_string()),
            ("--runroot", dir.join("run").into_os_string()),
            ("--storage-driver", "vfs".into()),
            ("--runtime", "runc".into()),
            ("--cgroup-manager", "cgroupfs".into()),
            ("--events-backend", "file".into()),
        ] {
            global_args.push(flag.into());
            global_args.push(value);
        }
        Ok(Self {
            kind: Kind::Podman,
            global_args,
            env: vec![("CONTAINERS_CONF", conf.into_os_string())],
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The engine's command with its global flags, ready for a subcommand.
    pub fn command(&self) -> Command {
        let mut command = Command::new(self.kind.program());
        command.args(&self.global_args);
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    /// Runs `args` and returns stdout; a failure carries what it printed.
    pub fn output<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        crate::output(self.command().args(args))
    }

    /// Builds one image, its output going to ours.
    pub fn build(&self, build: &Build<'_>) -> Result<()> {
        let mut command = self.command();
        match self.kind {
            // --load: into the local image store, where `docker run` and the size are.
            Kind::Docker => command.args(["buildx", "build", "--load"]),
            // Docker's format keeps HEALTHCHECK, which the OCI image config has no field for.
            Kind::Podman => command.args(["build", "--format", "docker"]),
        };
        command.arg("--file").arg(build.dockerfile);
        for tag in build.tags {
            command.args(["--tag", tag]);
        }
        for (name, value) in build.args {
            command.arg("--build-arg").arg(format!("{name}={value}"));
        }
        for (name, path) in build.named_contexts {
            let mut value = OsString::from(format!("{name}="));
            value.push(path);
            command.arg("--build-context").arg(value);
        }
        command.arg(build.context);
        let status = command
            .status()
            .with_context(|| format!("cannot run {command:?}"))?;
        if !status.success() {
            bail!("building {} failed ({status})", build.dockerfile.display());
        }
        Ok(())
    }

    /// The image's size in bytes, as the engine counts it.
    pub fn image_size(&self, image: &str) -> Result<u64> {
        let size = self.output(["image", "inspect", "--format", "{{.Size}}", image])?;
        size.trim()
            .parse()
            .with_context(|| format!("{image}'s size is not a number: {size:?}"))
    }
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `bytes` as MB with one decimal, the unit engines print.
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
