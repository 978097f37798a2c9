//! Who holds a TCP port: read from /proc, so that `up` can say more than "address in use".

use std::fs;

/// The process listening on `port` on any address, as `pid (name)`, if it can be found.
pub fn listener_of(port: u16) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .find_map(|line| listening_inode(&line, port))?;
    let needle = format!("socket:[{inode}]");
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let holds = fs::read_dir(entry.path().join("fd"))
            .ok()?
            .flatten()
            .any(|fd| {
                fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == needle.as_str())
            });
        if !holds {
            return None;
        }
        let name = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        Some(format!("pid {pid} ({})", name.trim()))
    })
}

/// `sl local_address rem_address st … inode` rows; state 0A is LISTEN.
fn listening_inode(line: &str, port: u16) -> Option<String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local = fields.get(1)?;
    let (_, hex_port) = local.rsplit_once(':')?;
    let listening = fields.get(3)? == &"0A";
    (listening && u16::from_str_radix(hex_port, 16).ok()? == port)
        .then(|| fields.get(9).map(|s| (*s).to_owned()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let owner = listener_of(port).expect("our own socket should be found");
        assert!(owner.contains(&std::process::id().to_string()), "{owner}");
    }

    #[test]
    fn parses_proc_net_tcp_rows() {
        let row = "   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listening_inode(row, 8080), Some("12345".into()));
        assert_eq!(listening_inode(row, 8081), None);
        let established = row.replace(" 0A ", " 01 ");
        assert_eq!(listening_inode(&established, 8080), None);
    }
}
