//! Every service's migrations exist for both backends under the same names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn migrations_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations")
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let entry = entry.unwrap();
            for file in ["up.sql", "down.sql"] {
                assert!(
                    entry.path().join(file).is_file(),
                    "{} lacks {file}",
                    entry.path().display()
                );
            }
            entry.file_name().into_string().unwrap()
        })
        .collect()
}

#[test]
fn both_backends_hold_the_same_migration_names() {
    let mut services = 0;
    for service in std::fs::read_dir(migrations_root()).unwrap() {
        let service = service.unwrap().path();
        let postgres = names(&service.join("postgres"));
        let sqlite = names(&service.join("sqlite"));
        assert!(
            !postgres.is_empty(),
            "{} has no migrations",
            service.display()
        );
        assert_eq!(
            postgres,
            sqlite,
            "{}: the backends' migrations differ",
            service.display()
        );
        services += 1;
    }
    assert_eq!(
        services, 3,
        "the vault, registry and monitor each keep a database"
    );
}
