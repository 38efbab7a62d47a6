//! `FdTable`: the registry's map from fd to entry, indexed by the fd itself.
//!
//! The kernel hands out the lowest free fd, so the fds a loop watches are dense: a table in
//! pages of `PAGE` slots (allocated when first used) costs one slot per fd up to the highest
//! one, with no hashing on the per-event lookup. A `HashMap` spent about twice the memory per
//! watched fd (buckets at a 7/8 load factor, control bytes, the key). A sparse high fd (a
//! `dup2` to a large number) costs one page, not a table up to it.

use std::os::fd::RawFd;

use super::FdEntry;

const PAGE_BITS: u32 = 10;
const PAGE: usize = 1 << PAGE_BITS;

pub struct FdTable<T> {
    pages: Vec<Option<Box<[FdEntry<T>]>>>,
    len: usize,
}

impl<T> FdEntry<T> {
    const VACANT: Self = Self { fileobj: None, reader: None, writer: None };

    fn occupied(&self) -> bool {
        self.fileobj.is_some() || self.reader.is_some() || self.writer.is_some()
    }
}

fn split(fd: RawFd) -> Option<(usize, usize)> {
    let fd = usize::try_from(fd).ok()?;
    Some((fd >> PAGE_BITS, fd & (PAGE - 1)))
}

impl<T> FdTable<T> {
    pub fn new() -> Self {
        Self { pages: Vec::new(), len: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot(&self, fd: RawFd) -> Option<&FdEntry<T>> {
        let (page, i) = split(fd)?;
        self.pages.get(page)?.as_ref().map(|p| &p[i])
    }

    fn slot_mut(&mut self, fd: RawFd) -> Option<&mut FdEntry<T>> {
        let (page, i) = split(fd)?;
        self.pages.get_mut(page)?.as_mut().map(|p| &mut p[i])
    }

    pub fn get(&self, fd: RawFd) -> Option<&FdEntry<T>> {
        self.slot(fd).filter(|e| e.occupied())
    }

    pub fn get_mut(&mut self, fd: RawFd) -> Option<&mut FdEntry<T>> {
        self.slot_mut(fd).filter(|e| e.occupied())
    }

    pub fn contains(&self, fd: RawFd) -> bool {
        self.get(fd).is_some()
    }

    /// The fd's entry, vacant (every slot empty) if it was not registered; it is counted as
    /// registered from now on, so the caller fills a slot in (or `remove`s it, after putting
    /// something in it). `None` for a negative fd.
    pub fn entry(&mut self, fd: RawFd) -> Option<&mut FdEntry<T>> {
        let (page, i) = split(fd)?;
        if self.pages.len() <= page {
            self.pages.resize_with(page + 1, || None);
        }
        let p = self.pages[page].get_or_insert_with(|| (0..PAGE).map(|_| FdEntry::VACANT).collect());
        let e = &mut p[i];
        if !e.occupied() {
            self.len += 1;
        }
        Some(e)
    }

    /// Take the fd's entry out (`None` if it was not registered).
    pub fn remove(&mut self, fd: RawFd) -> Option<FdEntry<T>> {
        let e = self.slot_mut(fd)?;
        let was = e.occupied();
        let out = std::mem::replace(e, FdEntry::VACANT);
        if was {
            self.len -= 1;
            Some(out)
        } else {
            None
        }
    }

    /// Registered fds and their entries, in fd order.
    pub fn iter(&self) -> impl Iterator<Item = (RawFd, &FdEntry<T>)> {
        self.pages.iter().enumerate().flat_map(|(n, p)| {
            p.iter().flat_map(move |p| {
                p.iter().enumerate().filter(|(_, e)| e.occupied()).map(move |(i, e)| ((n * PAGE + i) as RawFd, e))
            })
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.iter().map(|(fd, _)| fd)
    }

    pub fn values(&self) -> impl Iterator<Item = &FdEntry<T>> {
        self.iter().map(|(_, e)| e)
    }

    /// Take every entry out; the pages are freed.
    pub fn drain(&mut self) -> Vec<FdEntry<T>> {
        self.len = 0;
        std::mem::take(&mut self.pages)
            .into_iter()
            .flatten()
            .flat_map(|p| p.into_vec().into_iter().filter(|e| e.occupied()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(t: &mut FdTable<u32>, fd: RawFd, v: u32) {
        t.entry(fd).unwrap().fileobj = Some(v);
    }

    #[test]
    fn insert_get_remove() {
        let mut t = FdTable::new();
        assert!(t.is_empty());
        assert!(t.get(3).is_none() && t.entry(-1).is_none() && t.get(-1).is_none());
        put(&mut t, 3, 30);
        put(&mut t, 5000, 50);
        put(&mut t, 3, 31);
        assert_eq!(t.len, 2);
        assert_eq!(t.get(3).unwrap().fileobj, Some(31));
        assert!(t.contains(5000) && !t.contains(4) && !t.contains(4999));
        assert_eq!(t.keys().collect::<Vec<_>>(), vec![3, 5000]);
        assert_eq!(t.remove(3).unwrap().fileobj, Some(31));
        assert!(t.remove(3).is_none() && t.remove(7).is_none() && t.remove(1 << 20).is_none());
        assert_eq!(t.len, 1);
        assert_eq!(t.drain().len(), 1);
        assert!(t.is_empty() && t.get(5000).is_none());
    }
}
