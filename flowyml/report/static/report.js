(function(){var tip=document.getElementById('tip');
document.querySelectorAll('svg.timeline rect,svg.timeline text').forEach(function(r){
var t=r.querySelector('title');if(!t)return;r.dataset.tip=t.textContent;t.remove();});
document.addEventListener('mousemove',function(e){var r=e.target.closest?e.target.closest('[data-tip]'):null;
if(!r){tip.style.display='none';return;}tip.textContent=r.dataset.tip;tip.style.display='block';
var x=e.clientX+14,y=e.clientY+14;if(x+tip.offsetWidth>innerWidth)x=e.clientX-tip.offsetWidth-10;
if(y+tip.offsetHeight>innerHeight)y=e.clientY-tip.offsetHeight-10;tip.style.left=x+'px';tip.style.top=y+'px';});
})();
