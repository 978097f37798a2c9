//! `cargo xtask build-images`: one image per service from `docker/<service>.Dockerfile`.
//!
//! ```text
//! cargo xtask build-images [SERVICE…] [--engine docker|podman] [--tag T] [--push REGISTRY] [--prebuilt]
//! ```
//!
//! Each image is tagged `concierge/<service>:<version>` and `:<revision>` (the git
//! revision, `-dirty` when the tree has changes), plus `--tag`s. `--prebuilt` builds the
//! release binaries on this host and hands the Dockerfile's `builder` stage over to a
//! directory holding the same root filesystem (`docker/rootfs.sh`), for machines that
//! cannot pull the Rust image; the runtime stage is the same either way.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::containers::{Build, Engine, Kind, megabytes};
use crate::{cargo, repo_root};

/// A service's image: its name (package, binary and image) and the port it serves.
#[derive(Clone, Copy, Debug)]
pub struct Image {
    pub service: &'static str,
    pub port: u16,
}

pub const IMAGES: [Image; 4] = [
    Image {
        service: "credential-vault",
        port: 8081,
    },
    Image {
        service: "service-registry",
        port: 8082,
    },
    Image {
        service: "health-monitor",
        port: 8083,
    },
    Image {
        service: "gateway",
        port: 8080,
    },
];

impl Image {
    pub fn dockerfile(&self, root: &Path) -> PathBuf {
        root.join("docker")
            .join(format!("{}.Dockerfile", self.service))
    }

    pub fn repository(&self) -> String {
        format!("concierge/{}", self.service)
    }
}

struct Options {
    images: Vec<Image>,
    engine: Option<Kind>,
    tags: Vec<String>,
    push: Option<String>,
    prebuilt: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        images: Vec::new(),
        engine: None,
        tags: Vec::new(),
        push: None,
        prebuilt: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match arg.as_str() {
            "--engine" => options.engine = Some(Kind::parse(&value("--engine")?)?),
            "--tag" => options.tags.push(value("--tag")?),
            "--push" => options.push = Some(value("--push")?),
            "--prebuilt" => options.prebuilt = true,
            name => {
                let image = IMAGES
                    .iter()
                    .find(|image| image.service == name)
                    .with_context(|| {
                        let names: Vec<_> = IMAGES.iter().map(|i| i.service).collect();
                        format!("unknown service {name:?}: one of {}", names.join(", "))
                    })?;
                options.images.push(*image);
            }
        }
    }
    if options.images.is_empty() {
        options.images = IMAGES.to_vec();
    }
    Ok(options)
}

pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let root = repo_root();
    let engine = Engine::detect(options.engine)?;
    println!("xtask: building images with {:?}", engine.kind());
    let built = build_all(
        &engine,
        &root,
        &options.images,
        &options.tags,
        options.prebuilt,
    )?;
    println!();
    for (image, tags) in &built {
        let size = engine.image_size(&tags[0])?;
        println!(
            "  {:<28} {:>9}  {}",
            image.repository(),
            megabytes(size),
            tags.join(" ")
        );
    }
    if let Some(registry) = &options.push {
        for (_, tags) in &built {
            for tag in tags {
                let remote = format!("{}/{tag}", registry.trim_end_matches('/'));
                engine.output(["tag", tag, &remote])?;
                let status = engine
                    .command()
                    .args(["push", &remote])
                    .status()
                    .context("cannot run push")?;
                if !status.success() {
                    bail!("pushing {remote} failed ({status})");
                }
                println!("xtask: pushed {remote}");
            }
        }
    }
    Ok(())
}

/// Builds `images` (for `--prebuilt`, the release binaries and root filesystems first)
/// and returns each with its tags, the first being `:<version>`.
pub fn build_all(
    engine: &Engine,
    root: &Path,
    images: &[Image],
    extra_tags: &[String],
    prebuilt: bool,
) -> Result<Vec<(Image, Vec<String>)>> {
    if prebuilt {
        prepare_prebuilt(root, images)?;
    }
    let version = workspace_version(root)?;
    let revision = git_revision(root);
    let build_args = [
        ("VERSION", version.clone()),
        ("REVISION", revision.clone()),
        ("CREATED", created()),
        ("SOURCE", source(root)),
    ];
    let mut built = Vec::new();
    for image in images {
        let repository = image.repository();
        let mut tags = vec![
            format!("{repository}:{version}"),
            format!("{repository}:{revision}"),
        ];
        tags.extend(extra_tags.iter().map(|tag| format!("{repository}:{tag}")));
        let rootfs = prebuilt_dir(root, image);
        let named_contexts: Vec<(&str, &Path)> = if prebuilt {
            vec![("builder", rootfs.as_path())]
        } else {
            Vec::new()
        };
        println!("xtask: building {repository}");
        engine.build(&Build {
            dockerfile: &image.dockerfile(root),
            context: root,
            tags: &tags,
            args: &build_args,
            named_contexts: &named_contexts,
        })?;
        built.push((*image, tags));
    }
    Ok(built)
}

/// Where the host-built root filesystem of `image` goes: `out/` in it is what the
/// Dockerfile's builder stage leaves in `/out`.
fn prebuilt_dir(root: &Path, image: &Image) -> PathBuf {
    root.join("target/images").join(image.service)
}

/// Release binaries for `images`, and each one's root filesystem by `docker/rootfs.sh`.
fn prepare_prebuilt(root: &Path, images: &[Image]) -> Result<()> {
    println!("xtask: building the release binaries on this host");
    let mut build = cargo();
    build
        .args(["build", "--release", "--locked"])
        .current_dir(root);
    for image in images {
        build.args(["--bin", image.service]);
    }
    if !build.status().context("cannot run cargo build")?.success() {
        bail!("the release build failed");
    }
    for image in images {
        let dir = prebuilt_dir(root, image);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let binary = crate::cargo_target_dir()
            .join("release")
            .join(image.service);
        let status = Command::new("sh")
            .arg(root.join("docker/rootfs.sh"))
            .arg(&binary)
            .arg(dir.join("out"))
            .status()
            .context("cannot run docker/rootfs.sh")?;
        if !status.success() {
            bail!("docker/rootfs.sh {} failed ({status})", binary.display());
        }
    }
    Ok(())
}

fn workspace_version(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))
        .context("cannot read the workspace's Cargo.toml")?;
    // The first `version = "…"` is [workspace.package]'s; the workspace table is first.
    manifest
        .lines()
        .find_map(|line| {
            let value = line
                .strip_prefix("version")?
                .trim_start()
                .strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .context("no version in the workspace's Cargo.toml")
}

/// What `git args` prints in `root`, trimmed; `None` outside git or on a failure.
fn git(root: &Path, args: &[&str]) -> Option<String> {
    crate::output(Command::new("git").args(args).current_dir(root))
        .ok()
        .map(|out| out.trim().to_owned())
}

/// The short git revision, `-dirty` when tracked files have changes; `unknown` outside git.
fn git_revision(root: &Path) -> String {
    let Some(revision) = git(root, &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = git(root, &["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|changes| !changes.is_empty());
    if dirty {
        format!("{revision}-dirty")
    } else {
        revision
    }
}

/// The `origin` remote's URL, which is where the source is, without any user or token
/// in it (the label is public); `unknown` without one.
fn source(root: &Path) -> String {
    git(root, &["remote", "get-url", "origin"])
        .map(|url| without_userinfo(&url))
        .unwrap_or_else(|| "unknown".into())
}

/// `scheme://user:token@host/path` → `scheme://host/path`; other forms as they are.
fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// Now in RFC 3339, UTC, as the OCI annotation wants it.
fn created() -> String {
    crate::output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
        .map(|now| now.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::without_userinfo;

    #[test]
    fn source_urls_lose_their_credentials() {
        assert_eq!(
            without_userinfo("https://bot:ghp_secret@github.com/org/repo.git"),
            "https://github.com/org/repo.git"
        );
        assert_eq!(
            without_userinfo("https://github.com/org/repo"),
            "https://github.com/org/repo"
        );
        assert_eq!(
            without_userinfo("git@github.com:org/repo.git"),
            "git@github.com:org/repo.git"
        );
    }
}
